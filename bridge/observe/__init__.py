"""What watches the bridge: metrics, the analytics recorder, the decision log."""
