"""How far a bundle is from its float model: the distribution metrics (fidelity), re-running a bundle's stored probes
(verify), the NumPy backend checked against ONNX Runtime (cross_check) and the floor of that agreement on
int8-activation graphs (agreement). May import every runtime package except edge_runtime.cli; the exporter imports
fidelity for its own measurements.
"""
