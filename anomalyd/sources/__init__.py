"""Audio sources: microphones through PortAudio, and file replay. Both hand typed blocks to a sink."""
