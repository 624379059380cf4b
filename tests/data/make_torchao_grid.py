"""Write torchao_int4_grid.safetensors: torchao's symmetric int4 grid of one layer, the independent reference
tests/test_quant_convention.py checks daptq's ``symmetric_range="full"`` against.

torchao is not a daptq dependency (importing it makes every process print warnings), so its answer is stored
once. Re-generate (torchao 0.18.0, as in constraints.txt) with:

    pip install -c constraints.txt torchao && python tests/data/make_torchao_grid.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torchao.quantization import quant_primitives as qp


def main() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    scale, zp = qp.choose_qparams_affine(
        w, qp.MappingType.SYMMETRIC, (1, 32), torch.int8, quant_min=-8, quant_max=7, scale_dtype=torch.float32
    )
    codes = qp.quantize_affine(w, (1, 32), scale, zp, torch.int8, quant_min=-8, quant_max=7)
    out = Path(__file__).with_name("torchao_int4_grid.safetensors")
    import torchao

    save_file(
        {"weight": w, "scale": scale.contiguous(), "codes": codes.contiguous()},
        str(out),
        metadata={
            "torchao": torchao.__version__,
            "mapping": "SYMMETRIC",
            "block": "(1, 32)",
            "range": "-8..7",
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
