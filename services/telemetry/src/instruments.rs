//! Metric instruments described as data, so the code that records them and the checks of the
//! dashboards' queries read one definition.

/// The kind of an instrument (what the Prometheus name translation depends on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    UpDownCounter,
    Histogram,
}

/// One instrument: its OpenTelemetry name, unit (UCUM) and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub name: &'static str,
    pub unit: &'static str,
    pub kind: Kind,
    pub description: &'static str,
}
