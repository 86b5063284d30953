"""DIMSE transport: the C-STORE/C-ECHO SCP, the C-STORE SCU for results, and the status table."""
