"""Layer families by their public torch classes.

torch groups these layers under base classes of its own (``nn.modules.batchnorm._BatchNorm``,
``nn.modules.conv._ConvNd``, ``nn.modules.dropout._DropoutNd``), which are private; the
package tests membership against the public classes instead. Lazy layers become their
plain class once initialised; user subclasses of these classes belong to their family.
"""
from __future__ import annotations

from torch import nn

#: BatchNorm layers (training mode normalises with batch statistics).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
#: Convolutions, transposed ones included.
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.LazyConv1d, nn.LazyConv2d, nn.LazyConv3d, nn.LazyConvTranspose1d, nn.LazyConvTranspose2d,
                nn.LazyConvTranspose3d)
#: Dropout layers.
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
