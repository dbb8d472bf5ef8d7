"""The edge-runtime chat demo for Android phones (Termux) and its arm64 check."""
