"""The pipeline's stages, one module each, in data-flow order.

- ``capture``: a camera's frames, resized to the configured size, stamped, pushed (never blocking);
- ``features``: registration to the camera's reference and the SOARTC token features (the soartc stage);
- ``inference``: the ViT, the verdict, the attention-filtered highlight and its JPEG (the infer stage).

``FeaturesStage`` and ``InferenceStage`` are pure ``process(topic, header, arrays) -> messages`` classes
driven by ``runner.run_stage``; ``CaptureStage`` builds frame messages and ``run_capture`` is the
capture's own loop (a camera is a source, not a message). Sockets, signals and heartbeats are wired in
``stream_service.runtime.service``; processes are started and watched by ``stream_service.runtime.supervisor``.
"""
