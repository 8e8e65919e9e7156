"""The application layer: the command line and the runners that tie the library together
(extract-then-probe, the backbone grid, the LR finder). Library packages never import it."""
