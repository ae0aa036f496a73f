"""Rendering: rasterizers, conditioning images, albedo and lighting fit, synthetic actor."""
