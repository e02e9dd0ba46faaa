"""The model at run time: the ONNX Runtime session, the model card, golden reference storage."""
