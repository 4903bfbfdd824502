"""The PACS's way in: instances received over STOW-RS or C-STORE, made durable, analysed as
studies."""
