use super::*;

fn range(required: i64, limit: i64) -> CapacityRange {
    CapacityRange { required_bytes: required, limit_bytes: limit }
}

#[test]
fn capacity_rounds_up_to_mib_and_respects_limits() {
    assert_eq!(capacity(None, 0).unwrap(), DEFAULT_CAPACITY);
    assert_eq!(capacity(None, 3 * MIB).unwrap(), 3 * MIB);
    assert_eq!(capacity(Some(&range(1, 0)), 0).unwrap(), MIB);
    assert_eq!(capacity(Some(&range(MIB as i64, 0)), 0).unwrap(), MIB);
    assert_eq!(capacity(Some(&range(MIB as i64 + 1, 0)), 0).unwrap(), 2 * MIB);
    assert_eq!(capacity(Some(&range(0, 10 * MIB as i64)), 0).unwrap(), 10 * MIB);
    assert_eq!(capacity(Some(&range(0, 4 << 30)), 0).unwrap(), DEFAULT_CAPACITY);
    assert_eq!(capacity(Some(&range(1, 0)), 5 * MIB - 1).unwrap(), 5 * MIB);
    assert_eq!(capacity(Some(&range(0, 100)), 0).unwrap_err().kind(), Kind::OutOfRange);
    assert_eq!(capacity(Some(&range(2, 1)), 0).unwrap_err().kind(), Kind::OutOfRange);
    assert_eq!(capacity(Some(&range(-1, 0)), 0).unwrap_err().kind(), Kind::InvalidArgument);
    assert_eq!(capacity(Some(&range(i64::MAX, 0)), 0).unwrap_err().kind(), Kind::OutOfRange);
}

#[test]
fn pages_start_at_the_token_even_after_it_is_deleted() {
    let ids: Vec<String> = ["vol-a", "vol-b", "vol-d"].iter().map(|s| s.to_string()).collect();
    let valid = |s: &str| s.starts_with("vol-");
    let (p, next) = page(ids.iter(), "", 2, valid).unwrap();
    assert_eq!((p, next.as_str()), (vec!["vol-a".to_string(), "vol-b".to_string()], "vol-d"));
    let (p, next) = page(ids.iter(), "vol-c", 0, valid).unwrap();
    assert_eq!((p, next.as_str()), (vec!["vol-d".to_string()], ""));
    assert_eq!(page(ids.iter(), "junk", 0, valid).unwrap_err().kind(), Kind::Aborted);
    assert_eq!(page(ids.iter(), "", -1, valid).unwrap_err().kind(), Kind::InvalidArgument);
}

#[test]
fn strings_are_capped_before_use() {
    assert!(require("x", "name").is_ok());
    assert_eq!(require("", "name").unwrap_err().kind(), Kind::InvalidArgument);
    assert_eq!(require(&"x".repeat(MAX_STRING + 1), "name").unwrap_err().kind(), Kind::InvalidArgument);
}
