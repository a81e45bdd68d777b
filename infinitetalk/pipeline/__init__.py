"""The long-video generation job: request -> windows -> sampling -> streamed mp4."""
