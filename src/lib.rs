//! Retrace facade placeholder.
