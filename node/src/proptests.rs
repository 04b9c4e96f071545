//! Property tests: every decoder of outside input (kernel netlink replies,
//! mountinfo, state files) returns or refuses, never panics, and what we
//! encode decodes back to itself. The publish context and its nbdUri have
//! theirs next to the parser both binaries share (`csi_proto::contract`).

use proptest::prelude::*;

use crate::state::{Access, Phase, VolumeState};
use crate::sys::mount::parse_mountinfo;
use crate::sys::nbd_genl;
use crate::sys::netlink::{self, Attrs, GenlRequest, Message};

fn no_newline() -> impl Strategy<Value = String> {
    "[^\n\r]{0,40}"
}

fn access() -> impl Strategy<Value = Access> {
    let flags = prop::collection::vec("[a-z_=,]{1,10}", 0..4);
    prop_oneof![
        Just(Access::Block),
        ("[^\n\r]{1,12}", flags).prop_map(|(fs_type, flags)| Access::Mount { fs_type, flags })
    ]
}

fn state() -> impl Strategy<Value = VolumeState> {
    let phase = prop_oneof![Just(Phase::Attaching), Just(Phase::Staged), Just(Phase::Unstaging)];
    (
        ("[^\n\r=]{1,40}", phase, no_newline(), 1usize..9, any::<u32>(), any::<u32>()),
        (no_newline(), access(), any::<bool>(), any::<Option<u32>>(), proptest::option::of(no_newline())),
    )
        .prop_map(
            |((volume_id, phase, uri, connections, timeout, dead), (path, access, read_only, index, backend_id))| {
                VolumeState {
                    volume_id,
                    phase,
                    uri,
                    connections,
                    timeout_secs: timeout.into(),
                    dead_conn_timeout_secs: dead.into(),
                    staging_path: path.into(),
                    access,
                    read_only,
                    index,
                    backend_id,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn netlink_decoders_never_panic(buf in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(messages) = netlink::parse_messages(&buf) {
            for m in messages {
                if let Message::Genl { attrs, .. } = m {
                    let _ = nbd_genl::parse_status(attrs);
                    let _ = nbd_genl::parse_index(attrs);
                    let _ = netlink::parse_family(attrs);
                }
            }
        }
        prop_assert!(netlink::attrs(&buf).count() <= buf.len() / 4);
        let _ = nbd_genl::parse_status(&buf);
        let _ = netlink::parse_family(&buf);
    }

    #[test]
    fn encoded_requests_parse_back(
        family in 0x10u16..0x400,
        cmd in any::<u8>(),
        seq in any::<u32>(),
        values in prop::collection::vec((1u16..0x3fff, prop::collection::vec(any::<u8>(), 0..40)), 0..8),
    ) {
        let mut attrs = Attrs::new();
        for (kind, payload) in &values {
            attrs.put(*kind, payload);
        }
        let request = GenlRequest { family, cmd, version: 1, flags: 1, attrs };
        let bytes = request.encode(seq, 0);
        let messages = netlink::parse_messages(&bytes).unwrap();
        prop_assert_eq!(messages.len(), 1);
        let Message::Genl { kind, seq: got_seq, cmd: got_cmd, attrs } = &messages[0] else {
            return Err(TestCaseError::fail("not a generic netlink message"));
        };
        prop_assert_eq!((*kind, *got_seq, *got_cmd), (family, seq, cmd));
        let decoded: Vec<(u16, Vec<u8>)> = netlink::attrs(attrs).map(|(k, v)| (k, v.to_vec())).collect();
        prop_assert_eq!(decoded, values);
    }

    #[test]
    fn mountinfo_parser_never_panics(text in "\\PC{0,300}") {
        for entry in parse_mountinfo(&text) {
            prop_assert!(!entry.fstype.contains(' '));
        }
    }

    #[test]
    fn state_files_decode_or_refuse(text in "\\PC{0,300}") {
        let _ = VolumeState::decode(text.as_bytes());
        let _ = VolumeState::decode(format!("{{{text}").as_bytes());
    }

    #[test]
    fn states_round_trip(state in state()) {
        prop_assert_eq!(VolumeState::decode(&state.encode().unwrap()).unwrap(), state);
    }

    /// What older versions wrote still reads back (their flags could not
    /// hold a comma, a block volume had none, and no backend identifier was
    /// recorded).
    #[test]
    fn key_value_states_still_decode(state in state()) {
        let state = VolumeState { backend_id: None, ..state };
        let state = match state.access {
            Access::Mount { fs_type, flags } if !fs_type.contains('=') && fs_type != "block" => {
                let flags = flags.into_iter().filter(|f| !f.contains(',')).collect();
                VolumeState { access: Access::Mount { fs_type, flags }, ..state }
            }
            _ => VolumeState { access: Access::Block, ..state },
        };
        prop_assert_eq!(VolumeState::decode(state.encode_key_value().as_bytes()).unwrap(), state);
    }
}
