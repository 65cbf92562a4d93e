"""ONNX graphs with the CAM folded in, TensorRT engines, ``crack-export``  (imports models, train, runtime).

* :mod:`.onnx_export`  the graph wrapper (uint8 NHWC BGR in → ``prob``, ``map`` …), the exporters, atomic write
* :mod:`.verify`       ONNX Runtime vs PyTorch on random + synthetic crack images; refuses to write on mismatch
* :mod:`.metadata`     the ``metadata_props["crackcam"]`` JSON (schema in docs/contracts.md)
* :mod:`.tensorrt`     TensorRT 10 engines (profiles, FP16, INT8 calibration, engine cache)
* :mod:`.restoration`  UP-CrackNet generators as restoration graphs
* :mod:`.api`          ``export_checkpoint(run_dir, out, settings)``;  :mod:`.cli` the typer app
"""
