"""radpipe: a DICOM node that runs AI pipelines on what it receives and sends back DICOM SR."""

import logging

__version__ = "0.1.0"

# Logging is configured by the application (cli.py), never by the library.
logging.getLogger(__name__).addHandler(logging.NullHandler())
