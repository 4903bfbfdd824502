"""DICOM in and out: STOW-RS multipart, the C-STORE receiver, ingest of instances, the SR and
secondary capture we write, the result store and its delivery to a PACS."""
