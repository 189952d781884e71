"""The headroom scan: run samples, measure each module's peak, write a precision plan and report."""
