"""Plan, run and report: the stream from a reader through a quantizer into a writer."""
