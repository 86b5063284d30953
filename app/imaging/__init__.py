"""Imaging: routing DICOM instances to models, assembling studies, and the PACS outbox."""
