"""Result objects written for a finished job (DICOM SR; KOS and SEG later)."""
