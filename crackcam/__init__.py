"""crackcam: road-crack maps without pixel masks.

Sub-packages (imports point one way):
  models   networks, create_model, CAM heads   (imports nothing from train/export/runtime)
  train    data sets, augmentation, training loops, crack-train
  export   ONNX graphs with folded CAM outputs, TensorRT engines, crack-export
  runtime  torch-free sources, sessions, post-processing, sinks, crack-run
  tools    evaluation, benchmarks, figures
"""

__version__ = "0.1.0"
