"""Code both services share: settings, storage, errors, server assembly, logging."""
