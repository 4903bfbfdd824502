"""DICOM formats the service reads and writes: STOW-RS multipart/related bodies, and the SR and
secondary capture it makes of a study's answer."""
