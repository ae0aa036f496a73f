"""Batch jobs over whole videos: tracking a video, offline reenactment, the demo."""
