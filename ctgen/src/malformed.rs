//! Broken and hostile inputs (`--malformed DIR`): log files that are truncated, not gzip,
//! not CloudTrail, deeply nested, huge, bombs, invalid UTF-8, with repeated keys, wrong
//! types or markup; and odd SQS message bodies. `manifest.json` says what each one is.

use crate::json::J;
use crate::layout::{gzip, gzip_writer, put, s3_event};
use crate::world::ACCT_PROD;
use crate::{arr, obj, Summary};
use std::io::Write;
use std::path::Path;

fn good() -> J {
    obj! {
        "eventVersion" => "1.09", "eventSource" => "kms.amazonaws.com", "eventName" => "Decrypt",
        "eventTime" => "2026-10-01T00:00:00Z", "awsRegion" => "us-east-1",
        "eventID" => "00000000-0000-4000-8000-000000000000", "recipientAccountId" => ACCT_PROD,
        "userIdentity" => obj!{"type" => "AssumedRole", "arn" => format!("arn:aws:sts::{ACCT_PROD}:assumed-role/app/x"), "accountId" => ACCT_PROD},
    }
}

fn doc(records: Vec<J>) -> Vec<u8> {
    obj! {"Records" => J::Arr(records)}.python()
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len() + to.len());
    let mut rest = hay;
    while let Some(i) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

pub(crate) fn write(out: &Path) -> std::io::Result<Summary> {
    std::fs::create_dir_all(out)?;
    let plain = doc(vec![good()]);
    let mut manifest = Vec::new();
    let mut log = |name: &str, data: Vec<u8>, what: &str| -> std::io::Result<()> {
        put(&out.join(name), &data)?;
        manifest.push(obj! {"file" => name, "kind" => "log-file", "what" => what});
        Ok(())
    };
    let truncated = gzip(&plain.repeat(50));
    log(
        "truncated.json.gz",
        truncated[..truncated.len() - 40].to_vec(),
        "gzip stream cut short",
    )?;
    log(
        "not-gzip.json.gz",
        plain.clone(),
        "plain JSON under a .gz name",
    )?;
    log(
        "gzip-of-text.json.gz",
        gzip(&b"hello, this is not json\n".repeat(100)),
        "gzip of non-JSON text",
    )?;
    log(
        "no-records.json.gz",
        gzip(b"{\"foo\":[]}"),
        "valid JSON without Records",
    )?;
    log(
        "records-not-array.json.gz",
        gzip(b"{\"Records\":{\"a\":1}}"),
        "Records is an object",
    )?;
    let mut no_source = good();
    no_source.remove("eventSource");
    log(
        "missing-event-source.json.gz",
        gzip(&doc(vec![no_source])),
        "a record without eventSource",
    )?;
    let mut deep = b"{\"Records\":[{\"requestParameters\":".to_vec();
    deep.extend(std::iter::repeat_n(b'[', 100_000));
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend_from_slice(b"}]}");
    log("deep-nesting.json.gz", gzip(&deep), "100k nested arrays")?;
    let mut huge =
        b"{\"Records\":[{\"eventSource\":\"kms.amazonaws.com\",\"userAgent\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'A', 50_000_000));
    huge.extend_from_slice(b"\"}]}");
    log("huge-string.json.gz", gzip(&huge), "a 50 MB string field")?;
    drop(huge);
    // The bomb is streamed: 1 GB of spaces never sits in memory.
    let bomb = out.join("gzip-bomb.json.gz");
    let mut w = gzip_writer(&bomb)?;
    w.write_all(b"{\"Records\":[")?;
    let spaces = vec![b' '; 1 << 20];
    let mut left = 1_000_000_000usize;
    while left > 0 {
        let n = left.min(spaces.len());
        w.write_all(&spaces[..n])?;
        left -= n;
    }
    w.write_all(b"]}")?;
    w.finish()?.into_inner().map_err(|e| e.into_error())?;
    manifest.push(obj! {"file" => "gzip-bomb.json.gz", "kind" => "log-file", "what" => "1 GB of spaces compressing to about 1 MB"});
    let mut log = |name: &str, data: Vec<u8>, what: &str| -> std::io::Result<()> {
        put(&out.join(name), &data)?;
        manifest.push(obj! {"file" => name, "kind" => "log-file", "what" => what});
        Ok(())
    };
    log(
        "invalid-utf8.json.gz",
        gzip(&replace(&plain, b"Decrypt", b"Dec\xff\xferypt")),
        "invalid UTF-8 inside a string",
    )?;
    log(
        "duplicate-keys.json.gz",
        gzip(&replace(
            &plain,
            b"\"eventName\": \"Decrypt\"",
            b"\"eventName\": \"Decrypt\", \"eventName\": \"ScheduleKeyDeletion\"",
        )),
        "duplicate eventName keys",
    )?;
    let mut wrong = good();
    wrong.set("eventName", J::Int(42));
    wrong.set("userIdentity", "root".into());
    wrong.set("eventTime", J::Null);
    log(
        "wrong-types.json.gz",
        gzip(&doc(vec![wrong])),
        "numbers and strings where objects are expected",
    )?;
    log("empty.json.gz", gzip(b""), "gzip of nothing")?;
    let mut evil = good();
    evil.set(
        "userAgent",
        "evil\r\nBcc: attacker@example.com\r\n<script>alert(1)</script>\u{0}".into(),
    );
    log(
        "control-chars.json.gz",
        gzip(&doc(vec![evil])),
        "header-injection and HTML in a field that ends up in alerts",
    )?;

    let key = "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/odd name+plus ü.json.gz";
    let t0 = crate::time::parse("2026-10-01T00:00:00Z").expect("a fixed time");
    let sns_inner = obj! {"s3Bucket" => "trail-bucket", "s3ObjectKey" => arr![key.replace("odd name+plus ü", "a")]};
    let notes: Vec<(&str, Vec<u8>, &str)> = vec![
        ("s3-event-odd-key.json", s3_event("trail-bucket", key, 10, "us-east-1", t0).python(), "S3 event whose key has a space, a plus and a non-ASCII letter"),
        ("s3-test-event.json", obj!{"Service" => "Amazon S3", "Event" => "s3:TestEvent", "Time" => "2026-10-01T00:00:00.000Z", "Bucket" => "trail-bucket", "RequestId" => "5582815E1AEA5ADF", "HostId" => "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"}.python(), "s3:TestEvent sent when notifications are configured"),
        ("sns-wrapped.json", obj!{"Type" => "Notification", "MessageId" => "b1b2", "TopicArn" => "arn:aws:sns:us-east-1:111122223333:trail", "Message" => String::from_utf8(sns_inner.python()).expect("UTF-8"), "Timestamp" => "2026-10-01T00:00:00.000Z"}.python(), "CloudTrail's SNS notification, wrapped in an SNS envelope"),
        ("eventbridge-object-created.json", obj!{"version" => "0", "id" => "17793124-05d4-b198-2fde-7ededc63b103", "detail-type" => "Object Created", "source" => "aws.s3", "account" => ACCT_PROD, "time" => "2026-10-01T00:00:00Z", "region" => "us-east-1", "resources" => arr!["arn:aws:s3:::trail-bucket"], "detail" => obj!{"version" => "0", "bucket" => obj!{"name" => "trail-bucket"}, "object" => obj!{"key" => key.replace("odd name+plus ü", "b"), "size" => 5576i64, "etag" => "b1946ac92492d2347c6235b4d2611184", "sequencer" => "00617F08299329D189"}, "request-id" => "N4N7GDK58NMKJ12R", "requester" => "cloudtrail.amazonaws.com", "reason" => "PutObject"}}.python(), "EventBridge form of an S3 Object Created event"),
        ("not-json.json", b"this is not json".to_vec(), "a message body that is not JSON"),
        ("empty-records.json", b"{\"Records\": []}".to_vec(), "S3 event with no records"),
    ];
    for (name, data, what) in notes {
        put(&out.join(name), &data)?;
        manifest.push(obj! {"file" => name, "kind" => "sqs-message-body", "what" => what});
    }
    let text = J::Arr(manifest.clone()).indented();
    put(&out.join("manifest.json"), text.as_bytes())?;
    let lines: Vec<String> = manifest
        .iter()
        .map(|m| {
            format!(
                "{}: {}",
                m.get("file").and_then(J::as_str).unwrap_or_default(),
                m.get("what").and_then(J::as_str).unwrap_or_default()
            )
        })
        .collect();
    Ok(Summary {
        files: manifest.len() as u64,
        note: lines.join("\n"),
        ..Summary::default()
    })
}
