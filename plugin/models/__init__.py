"""Model artifacts, architectures and the device they run on."""
