"""daptq.deploy: quantized policies on ONNX Runtime with real int4/int8 kernels, and `daptq bench`.

from daptq.deploy import export_reference_policy, OnnxPolicy
export_reference_policy(policy, "out/w4a8-onnx")  # policy: a (fake-)quantized ReferencePolicy
deployed = OnnxPolicy("out/w4a8-onnx")             # or load_policy("onnx:out/w4a8-onnx")
"""

from daptq.deploy.export import export_graphs, export_onnx, export_reference_policy, read_manifest
from daptq.deploy.lowering import LayerPlan, lower_layer, lower_model_
from daptq.deploy.runtime import OnnxPolicy, make_session

__all__ = [
    "LayerPlan",
    "OnnxPolicy",
    "export_graphs",
    "export_onnx",
    "export_reference_policy",
    "lower_layer",
    "lower_model_",
    "make_session",
    "read_manifest",
]
