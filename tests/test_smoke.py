import torch

import polyak


def test_import_and_update():
    model = torch.nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(2.0)
    before = model.weight.detach().clone()
    ema.update()
    with ema.apply():
        torch.testing.assert_close(model.weight, before - 1.0)
    torch.testing.assert_close(model.weight, before)
