"""The package's public layer families cover every public torch layer of torch's private
family base classes (so a layer torch adds to a family is not silently left out)."""
from __future__ import annotations

import inspect

import pytest
from torch import nn

from lightning_ntk._modules import BATCH_NORMS, CONVOLUTIONS, DROPOUTS


@pytest.mark.parametrize("family,base", [
    (BATCH_NORMS, nn.modules.batchnorm._BatchNorm),
    (CONVOLUTIONS, nn.modules.conv._ConvNd),
    (DROPOUTS, nn.modules.dropout._DropoutNd),
], ids=["batchnorm", "conv", "dropout"])
def test_each_family_holds_every_public_torch_layer_of_its_base(family, base):
    public = {cls for name, cls in vars(nn).items()
              if inspect.isclass(cls) and not name.startswith("_") and issubclass(cls, base)}
    assert public == set(family)
    assert all(issubclass(cls, base) for cls in family)
