//! Integer arguments checked at the edge.
//!
//! pyo3 alone turns `-1` for an unsigned parameter into `OverflowError: can't convert negative
//! int to unsigned`, which names neither the argument nor the rule. Parameters that must be
//! non-negative (or positive) are taken as `i128` and converted here: a value out of range is a
//! `ValueError` that names the argument and says what it accepts.

use pyo3::exceptions::PyValueError;
use pyo3::PyResult;

/// `value` as a `T`, if it is at least `min` and fits; else a `ValueError` naming `name`.
pub(crate) fn int<T: TryFrom<i128>>(name: &str, value: i128, min: i128) -> PyResult<T> {
    if value < min {
        let rule = if min == 0 {
            "must not be negative".to_string()
        } else {
            format!("must be at least {min}")
        };
        return Err(PyValueError::new_err(format!("{name} {rule}, got {value}")));
    }
    T::try_from(value).map_err(|_| PyValueError::new_err(format!("{name} is too large: {value}")))
}

/// [`int`] for an optional argument (None stays None).
pub(crate) fn opt_int<T: TryFrom<i128>>(
    name: &str,
    value: Option<i128>,
    min: i128,
) -> PyResult<Option<T>> {
    value.map(|v| int(name, v, min)).transpose()
}
