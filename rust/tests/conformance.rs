//! The public RFC 6902 conformance cases in `tests/data/rfc6902-spec-tests.json`
//! (json-patch-tests format; origin and licence in `tests/data/README.md`): the expected
//! document, or an error where the case has "error"; "disabled" cases are skipped.
//! The file is part of the repository: a missing file fails the test, never skips it.

use kasagi_native::apply::{apply_patch_atomic, parse_ops};
use kasagi_native::json;
use serde_json::Value;
use std::path::PathBuf;

fn cases_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/rfc6902-spec-tests.json")
}

#[test]
fn rfc6902_spec_tests() {
    let path = cases_file();
    let bytes = std::fs::read(&path).unwrap_or_else(|err| {
        panic!(
            "{}: {err} (the conformance cases are part of the repository, see tests/data/README.md)",
            path.display()
        )
    });
    let cases = json::parse(&bytes).expect("conformance file is JSON");
    let cases = cases.as_array().expect("a JSON array of cases");
    let mut ran = 0;
    for case in cases {
        let name = case.get("comment").and_then(Value::as_str).unwrap_or("?");
        if case.get("disabled").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let doc = case.get("doc").cloned().unwrap_or(Value::Null);
        let patch = case.get("patch").cloned().unwrap_or(Value::Null);
        let mut got = doc.clone();
        let result = parse_ops(patch).and_then(|ops| apply_patch_atomic(&mut got, &ops));
        if case.get("error").is_some() {
            assert!(result.is_err(), "{name}: expected an error, got {got}");
            assert_eq!(got, doc, "{name}: a failing patch changed the document");
        } else {
            assert!(result.is_ok(), "{name}: {:?}", result.err());
            if let Some(expected) = case.get("expected") {
                assert_eq!(&got, expected, "{name}");
            }
        }
        ran += 1;
    }
    // 16 enabled cases today: a truncated or emptied file must not pass.
    assert!(ran >= 16, "only {ran} conformance cases ran");
    println!("{ran} conformance cases passed");
}
