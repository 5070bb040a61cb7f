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
