"""Round-to-nearest weight-only INT4/INT8, group-wise or per channel, symmetric or asymmetric.

Each group's scale (and zero point) comes from its own min/max; no calibration data. The baseline that
AWQ and GPTQ must beat at the same grid. Limits: outlier weights stretch their group's scale.
"""

from __future__ import annotations

from optforge.pass_ import register
from optforge.passes.quant.weight_only import WeightOnlyConfig, WeightOnlyPass


@register
class RoundToNearest(WeightOnlyPass):
    name = "quant.rtn"
    version = 1
    Config = WeightOnlyConfig
    method = "rtn"

    def quantize(self, model, tokenizer, targets, grids, ctx, swap):
        return {}, {"method": "rtn", "calibrated": False}  # each Linear rounded as it is swapped (WeightOnlyPass.run)
