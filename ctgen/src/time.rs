//! Unix seconds to and from the text forms the generator writes (CloudTrail's
//! `eventTime`, file-name stamps, day folders), without a date crate.

/// `YYYY-MM-DDTHH:MM:SSZ` -> Unix seconds (also `YYYY-MM-DD`).
pub fn parse(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let secs = if b.len() >= 19 {
        num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?
    } else {
        0
    };
    Some(days * 86_400 + secs)
}

pub struct Civil {
    pub year: i64,
    pub month: i64,
    pub day: i64,
    pub hour: i64,
    pub minute: i64,
    pub second: i64,
}

pub fn civil(secs: i64) -> Civil {
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    Civil {
        year,
        month,
        day,
        hour: rem / 3600,
        minute: rem % 3600 / 60,
        second: rem % 60,
    }
}

/// CloudTrail's `eventTime`: `2026-10-01T00:47:05Z`.
pub fn iso(secs: i64) -> String {
    let c = civil(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// An S3 event's `eventTime`: `2026-10-01T00:05:00.000Z`.
pub fn iso_millis(secs: i64) -> String {
    let mut s = iso(secs);
    s.insert_str(19, ".000");
    s
}

/// A log file name's stamp: `20261001T0005Z`.
pub fn stamp(secs: i64) -> String {
    let c = civil(secs);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute
    )
}

/// A day folder: `2026/10/01`.
pub fn day_path(secs: i64) -> String {
    let c = civil(secs);
    format!("{:04}/{:02}/{:02}", c.year, c.month, c.day)
}

pub fn hour_of_day(secs: i64) -> i64 {
    secs.rem_euclid(86_400) / 3600
}

/// The same day at `hour` (minutes and seconds kept), as Python's `t.replace(hour=h)`.
pub fn with_hour(secs: i64, hour: i64) -> i64 {
    secs - hour_of_day(secs) * 3600 + hour * 3600
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_formats() {
        let t = parse("2026-10-01T12:34:56Z").unwrap();
        assert_eq!(iso(t), "2026-10-01T12:34:56Z");
        assert_eq!(iso_millis(t), "2026-10-01T12:34:56.000Z");
        assert_eq!(stamp(t), "20261001T1234Z");
        assert_eq!(day_path(t), "2026/10/01");
        assert_eq!(parse("2026-10-01"), parse("2026-10-01T00:00:00Z"));
        assert_eq!(iso(with_hour(t, 3)), "2026-10-01T03:34:56Z");
        assert_eq!(parse("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            iso(parse("2024-02-29T23:59:59Z").unwrap() + 1),
            "2024-03-01T00:00:00Z"
        );
    }
}
