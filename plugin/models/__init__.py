"""Model artifacts (module, torch.export and ONNX formats), the architecture registry, and
the device they run on; ``importer`` serves ``radpipe import`` only, never the node."""
