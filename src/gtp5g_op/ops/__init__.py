"""Operations: metrics, logging, host readiness checks (doctor)."""
