"""The torch-free core that serving and training share: decoding, preprocessing, the model card,
onnxruntime models, the pipeline and its post-processing, operating points, the typed answer.
Nothing here imports a web framework (tests/app/inference/test_layering.py checks it)."""
