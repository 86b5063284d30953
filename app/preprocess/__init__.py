"""Preprocessing: pure functions from decoded DICOM pixels to model tensors."""
