use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;

use super::*;

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn parses_host_port_export() {
    let u = NbdUri::parse("nbd://10.0.0.5:10900/vol-abc").unwrap();
    assert_eq!(u, NbdUri { host: "10.0.0.5".into(), port: 10900, export: "vol-abc".into(), tls: false });
    assert_eq!(u.authority(), "10.0.0.5:10900");
}

/// `nbds://` is the same URI with TLS required; it round-trips, and the
/// default stays plaintext (`nbd://`, and `NbdUri::new`).
#[test]
fn nbds_requires_tls_and_round_trips() {
    let u = NbdUri::parse("nbds://10.0.0.5:10900/vol-abc").unwrap();
    assert_eq!(u, NbdUri { host: "10.0.0.5".into(), port: 10900, export: "vol-abc".into(), tls: true });
    assert_eq!(u.to_uri_string(), "nbds://10.0.0.5:10900/vol-abc");
    assert_eq!(u.to_string(), "nbds://10.0.0.5:10900/<export>");
    assert_eq!(NbdUri::parse(&u.to_uri_string()), Ok(u.clone()));
    let v6 = NbdUri::parse("nbds://[fd00::1]/x?tls-certificates=/etc/pki").unwrap();
    assert_eq!((v6.host.as_str(), v6.port, v6.export.as_str(), v6.tls), ("fd00::1", 10809, "x", true));
    assert!(!NbdUri::parse("nbd://10.0.0.5:10900/vol-abc").unwrap().tls);
    let plain = NbdUri::new("127.0.0.1:1".parse().unwrap(), "e");
    assert!(!plain.tls);
    assert_eq!(plain.to_uri_string(), "nbd://127.0.0.1:1/e");
    assert_eq!(plain.with_tls(true).to_uri_string(), "nbds://127.0.0.1:1/e");
    // Through the publish context both binaries parse.
    let context = PublishContext { nbd_uri: u, read_only: false };
    assert_eq!(PublishContext::try_from(&context.to_map()), Ok(context));
}

#[test]
fn default_port_and_empty_export() {
    let u = NbdUri::parse("nbd://node-a").unwrap();
    assert_eq!((u.port, u.export.as_str()), (10809, ""));
    let u = NbdUri::parse("nbd://[fd00::1]/x").unwrap();
    assert_eq!((u.host.as_str(), u.port), ("fd00::1", 10809));
}

#[test]
fn ipv6_and_escapes() {
    let u = NbdUri::parse("nbd://[::1]:2000/a%2Fb%20c").unwrap();
    assert_eq!((u.host.as_str(), u.port, u.export.as_str()), ("::1", 2000, "a/b c"));
    assert_eq!(u.authority(), "[::1]:2000");
}

#[test]
fn query_and_fragment_are_ignored() {
    let u = NbdUri::parse("nbd://h:1/x?tls=off#frag").unwrap();
    assert_eq!((u.host.as_str(), u.export.as_str()), ("h", "x"));
}

#[test]
fn rejects_bad_uris() {
    assert!(matches!(NbdUri::parse("nbdx://h/x"), Err(UriError::Scheme(_))));
    assert!(matches!(NbdUri::parse("nbd+unix:///x"), Err(UriError::Scheme(_))));
    assert!(matches!(NbdUri::parse("NBDS://h/x"), Err(UriError::Scheme(_))));
    assert!(matches!(NbdUri::parse("nbds:/h/x"), Err(UriError::Scheme(_))));
    assert!(matches!(NbdUri::parse("nbds:///x"), Err(UriError::Host(_))));
    assert!(matches!(NbdUri::parse("nbds://h:0/x"), Err(UriError::Port(_))));
    assert!(matches!(NbdUri::parse(""), Err(UriError::Scheme(_))));
    assert!(matches!(NbdUri::parse("nbd:///x"), Err(UriError::Host(_))));
    assert!(matches!(NbdUri::parse("nbd://[::1/x"), Err(UriError::Host(_))));
    assert!(matches!(NbdUri::parse("nbd://::1/x"), Err(UriError::Host(_))));
    assert!(matches!(NbdUri::parse("nbd://h:99999/x"), Err(UriError::Port(_))));
    assert!(matches!(NbdUri::parse("nbd://h:0/x"), Err(UriError::Port(_))));
    assert!(matches!(NbdUri::parse("nbd://h:/x"), Err(UriError::Port(_))));
    assert!(matches!(NbdUri::parse("nbd://[::1]2000/x"), Err(UriError::Port(_))));
    assert!(matches!(NbdUri::parse("nbd://h/%zz"), Err(UriError::Escape)));
    assert!(matches!(NbdUri::parse("nbd://h/%+f"), Err(UriError::Escape)));
    assert!(matches!(NbdUri::parse("nbd://h/%4"), Err(UriError::Escape)));
    assert!(matches!(NbdUri::parse("nbd://h/%ff"), Err(UriError::Escape)), "not UTF-8");
}

#[test]
fn length_is_capped() {
    let long_export = "a".repeat(MAX_STRING_LEN as usize + 1);
    assert_eq!(NbdUri::parse(&format!("nbd://h/{long_export}")), Err(UriError::ExportTooLong));
    let huge = format!("nbd://h/{}", "a".repeat(MAX_URI_LEN));
    assert_eq!(NbdUri::parse(&huge), Err(UriError::TooLong(huge.len())));
    // The longest export name, fully escaped, still fits.
    let widest = NbdUri { host: "h".into(), port: 1, export: "/".repeat(MAX_STRING_LEN as usize), tls: true };
    assert_eq!(NbdUri::parse(&widest.to_uri_string()), Ok(widest));
}

#[test]
fn errors_and_display_never_show_the_export_token() {
    let u = NbdUri::parse(&format!("nbd://h:1/{TOKEN}")).unwrap();
    assert!(!u.to_string().contains(TOKEN), "{u}");
    for bad in [
        format!("http://h:1/{TOKEN}"),
        format!("nbd://:1/{TOKEN}"),
        format!("nbd://h:x/{TOKEN}"),
        format!("nbd://h/{TOKEN}%zz"),
    ] {
        let err = NbdUri::parse(&bad).unwrap_err();
        assert!(!err.to_string().contains(TOKEN), "{err}");
        let context = ContextError::from(err);
        assert!(!context.to_string().contains(TOKEN), "{context}");
    }
}

#[test]
fn builds_the_uri_the_controller_always_wrote() {
    let v4 = NbdUri::new(SocketAddr::from((Ipv4Addr::new(10, 0, 0, 5), 10900)), TOKEN);
    assert_eq!(v4.to_uri_string(), format!("nbd://10.0.0.5:10900/{TOKEN}"));
    let v6 = NbdUri::new(SocketAddr::from((Ipv6Addr::LOCALHOST, 2000)), "a/b c");
    assert_eq!(v6.to_uri_string(), "nbd://[::1]:2000/a%2Fb%20c");
    assert_eq!(NbdUri::parse(&v6.to_uri_string()).unwrap(), v6);
}

fn publish_context() -> PublishContext {
    PublishContext { nbd_uri: NbdUri::new(SocketAddr::from(([127, 0, 0, 1], 10900)), TOKEN), read_only: true }
}

#[test]
fn publish_context_keeps_its_wire_format() {
    let ctx = publish_context();
    let wire = ctx.to_map();
    assert_eq!(wire, map(&[("nbdUri", &format!("nbd://127.0.0.1:10900/{TOKEN}")), ("readOnly", "true")]));
    assert_eq!(PublishContext::try_from(&wire), Ok(ctx));
}

#[test]
fn publish_context_of_older_controllers_still_parses() {
    // Written before multiConn was dropped: the node ignores it.
    let old = map(&[("nbdUri", "nbd://10.0.0.5:10900/tok"), ("readOnly", "false"), ("multiConn", "true")]);
    let ctx = PublishContext::try_from(&old).unwrap();
    assert_eq!((ctx.nbd_uri.export.as_str(), ctx.read_only), ("tok", false));
    // Made by hand, without readOnly.
    let ctx = PublishContext::try_from(&map(&[("nbdUri", "nbd://h/tok")])).unwrap();
    assert!(!ctx.read_only);
}

#[test]
fn publish_context_rejections_name_the_key() {
    let missing = PublishContext::try_from(&map(&[("readOnly", "true")])).unwrap_err();
    assert_eq!(missing, ContextError::Missing { context: "publish_context", key: "nbdUri" });
    assert_eq!(missing.to_string(), "publish_context has no nbdUri");

    let bad_uri = PublishContext::try_from(&map(&[("nbdUri", "nbd://h:x/tok")])).unwrap_err();
    assert_eq!(bad_uri, ContextError::Uri(UriError::Port("x".into())));
    assert_eq!(bad_uri.to_string(), "publish_context nbdUri: bad port \"x\"");

    let bad_flag = PublishContext::try_from(&map(&[("nbdUri", "nbd://h/tok"), ("readOnly", "yes")])).unwrap_err();
    assert!(matches!(&bad_flag, ContextError::Bad { key: "readOnly", value, .. } if value == "yes"), "{bad_flag}");
    assert!(bad_flag.to_string().contains("readOnly"), "{bad_flag}");
}

#[test]
fn volume_context_keeps_its_wire_format() {
    let block = VolumeContext { name: "pvc-1".into(), access: VolumeAccess::Block };
    assert_eq!(block.to_map(), map(&[("name", "pvc-1"), ("accessType", "block")]));
    let xfs = VolumeContext { name: "pvc-2".into(), access: VolumeAccess::Mount { fs_type: "xfs".into() } };
    assert_eq!(xfs.to_map(), map(&[("name", "pvc-2"), ("accessType", "mount"), ("fsType", "xfs")]));
    let default_fs = VolumeContext { name: "pvc-3".into(), access: VolumeAccess::Mount { fs_type: String::new() } };
    assert_eq!(default_fs.to_map(), map(&[("name", "pvc-3"), ("accessType", "mount")]));
    for ctx in [block, xfs, default_fs] {
        assert_eq!(VolumeContext::try_from(&ctx.to_map()), Ok(ctx));
    }
}

#[test]
fn volume_context_rejections_name_the_key() {
    let no_access = VolumeContext::try_from(&map(&[("name", "n")])).unwrap_err();
    assert_eq!(no_access, ContextError::Missing { context: "volume_context", key: "accessType" });
    assert_eq!(no_access.to_string(), "volume_context has no accessType");

    let no_name = VolumeContext::try_from(&map(&[("accessType", "block")])).unwrap_err();
    assert_eq!(no_name, ContextError::Missing { context: "volume_context", key: "name" });

    let unknown = VolumeContext::try_from(&map(&[("name", "n"), ("accessType", "file")])).unwrap_err();
    assert!(matches!(&unknown, ContextError::Bad { key: "accessType", value, .. } if value == "file"), "{unknown}");
    assert_eq!(unknown.to_string(), "volume_context accessType is \"file\", expected \"block\" or \"mount\"");

    let fs_on_block =
        VolumeContext::try_from(&map(&[("name", "n"), ("accessType", "block"), ("fsType", "ext4")])).unwrap_err();
    assert!(matches!(fs_on_block, ContextError::Bad { key: "fsType", .. }), "{fs_on_block}");
}

#[test]
fn storage_class_parameters_accept_only_the_reserved_prefix_and_the_selector() {
    let sidecars = map(&[("csi.storage.k8s.io/pvc/name", "x"), ("csi.storage.k8s.io/fstype", "xfs")]);
    assert_eq!(StorageClassParameters::try_from(&sidecars), Ok(StorageClassParameters::default()));
    assert_eq!(StorageClassParameters::try_from(&HashMap::new()), Ok(StorageClassParameters::default()));
    let selector = map(&[("storageNodeSelector", "zone=a,disk=ssd")]);
    let want = StorageClassParameters { storage_node_selector: Some("zone=a,disk=ssd".into()), tls: None };
    assert_eq!(StorageClassParameters::try_from(&selector), Ok(want));
    let unknown = map(&[("zeta", "1"), ("csi.storage.k8s.io/pvc/name", "x"), ("alpha", "2")]);
    let err = StorageClassParameters::try_from(&unknown).unwrap_err();
    assert_eq!(err, ParameterError::Unknown(vec!["alpha".into(), "zeta".into()]));
    assert_eq!(err.to_string(), "unknown parameters: alpha, zeta");
}

/// `tls` is parsed once, here: each spelling, none (the controller's
/// default), and anything else refused naming the values allowed.
#[test]
fn storage_class_parameter_tls_is_off_allowed_or_required() {
    for (value, want) in [("off", VolumeTls::Off), ("allowed", VolumeTls::Allowed), ("required", VolumeTls::Required)] {
        let parsed = StorageClassParameters::try_from(&map(&[("tls", value)])).unwrap();
        assert_eq!(parsed.tls, Some(want));
        assert_eq!(want.as_str(), value);
        assert_eq!(want.to_string(), value);
    }
    assert_eq!(StorageClassParameters::try_from(&map(&[("storageNodeSelector", "a=b")])).unwrap().tls, None);
    assert_eq!(VolumeTls::default(), VolumeTls::Off);
    for bad in ["Required", "on", "true", "", " required"] {
        let err = StorageClassParameters::try_from(&map(&[("tls", bad)])).unwrap_err();
        assert!(matches!(&err, ParameterError::Bad { key: "tls", value, .. } if value == bad), "{err}");
        assert_eq!(err.to_string(), format!("parameter tls is {bad:?}, expected one of off, allowed, required"));
    }
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<Ipv4Addr>().prop_map(|a| a.to_string()),
        any::<Ipv6Addr>().prop_map(|a| a.to_string()),
        "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?",
    ]
}

fn nbd_uri() -> impl Strategy<Value = NbdUri> {
    (host(), 1u16.., "\\PC{0,60}", any::<bool>()).prop_map(|(host, port, export, tls)| NbdUri {
        host,
        port,
        export,
        tls,
    })
}

proptest! {
    #[test]
    fn uris_parse_or_refuse(text in "\\PC{0,80}", suffix in "[a-zA-Z0-9%:/\\[\\]?#._-]{0,40}") {
        let _ = NbdUri::parse(&text);
        // Shown, a URI never carries its export name (a secret token).
        if let Ok(uri) = NbdUri::parse(&format!("nbd://{suffix}")) {
            prop_assert!(!uri.tls);
            prop_assert!(uri.to_string().ends_with("/<export>"), "{}", uri);
            // What parses builds back into something that parses the same.
            prop_assert_eq!(NbdUri::parse(&uri.to_uri_string()), Ok(uri));
        }
    }

    #[test]
    fn uris_round_trip(uri in nbd_uri()) {
        prop_assert_eq!(NbdUri::parse(&uri.to_uri_string()), Ok(uri));
    }

    #[test]
    fn publish_contexts_round_trip(nbd_uri in nbd_uri(), read_only in any::<bool>()) {
        let ctx = PublishContext { nbd_uri, read_only };
        prop_assert_eq!(PublishContext::try_from(&ctx.to_map()), Ok(ctx));
    }

    #[test]
    fn contexts_parse_or_refuse(pairs in proptest::collection::hash_map(
        prop_oneof![Just("nbdUri".to_string()), Just("readOnly".to_string()), Just("name".to_string()),
                    Just("accessType".to_string()), Just("fsType".to_string()), "\\PC{0,10}"],
        "\\PC{0,40}",
        0..6,
    )) {
        let _ = PublishContext::try_from(&pairs);
        let _ = VolumeContext::try_from(&pairs);
        let _ = StorageClassParameters::try_from(&pairs);
    }
}
