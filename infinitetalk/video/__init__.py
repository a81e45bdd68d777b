"""Image/video input at 25 fps and the streaming mp4 writer (PyAV)."""
