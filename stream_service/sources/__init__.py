"""Frame sources: cameras (device, RTSP/HTTP, file, folder) and the synthetic PCB camera."""
