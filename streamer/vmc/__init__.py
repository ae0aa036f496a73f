"""The VMC/OSC feed of each frame's parameters to avatar software."""
