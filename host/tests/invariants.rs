//! Architecture invariants that are about the shape of the code, checked on
//! the source itself (as rust-analyzer's tidy tests do).

use std::path::Path;

/// "Bus payloads are the types of `messages`; no stage builds or reads a
/// payload as untyped JSON" (ARCHITECTURE.md).
#[test]
fn stages_use_the_typed_messages() {
    let stages = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/pipeline");
    let mut checked = 0;
    for entry in std::fs::read_dir(&stages).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "mod.rs" {
            // Stage-independent plumbing; its only JSON is the metrics snapshot.
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            for untyped in ["json!(", ".get(\"", "serde_json::Value", "Value::"] {
                assert!(
                    !line.contains(untyped),
                    "{}:{}: `{untyped}` in a stage: payloads are the types of messages.rs\n{line}",
                    path.display(),
                    i + 1
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 4, "the four stages were read");
}

/// "Every SQL statement lives in `store`" (ARCHITECTURE.md): no SQL in the
/// stages, the HTTP API, ingest or the app assembly. (The embedded bus keeps
/// its own journal's statements in `bus/journal.rs`.)
#[test]
fn sql_lives_in_the_store() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join("app.rs"), src.join("health.rs")];
    for dir in ["pipeline", "api", "ingest", "windows", "dedupe"] {
        for entry in std::fs::read_dir(src.join(dir)).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        for (i, line) in text.lines().enumerate() {
            for sql in [
                "SELECT ",
                "INSERT INTO",
                "DELETE FROM",
                "UPDATE ",
                "sqlx::query",
            ] {
                assert!(
                    !line.contains(sql),
                    "{}:{}: `{sql}` outside the store: SQL lives in store/\n{line}",
                    path.display(),
                    i + 1
                );
            }
        }
    }
    assert!(files.len() > 10, "the modules were read");
}
