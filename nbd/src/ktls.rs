//! Kernel TLS (kTLS): a TLS session rustls negotiated, handed to the
//! kernel so that the socket itself encrypts and decrypts (the node plugin
//! then gives that socket to the NBD driver, which knows nothing of TLS).
//!
//! The order matters, as measured on a 6.1 kernel (see the issue's
//! reference notes): the whole NBD handshake, NBD_OPT_GO included, runs in
//! userspace; then rustls must hold nothing (no plaintext unread, no record
//! unsent) and the socket no unread byte, since any record the kernel
//! receives that is not application data (a session ticket, a KeyUpdate)
//! breaks the NBD driver's reads; then the keys and the exact sequence
//! numbers go to the socket: `TCP_ULP "tls"`, then `SOL_TLS` `TLS_TX` and
//! `TLS_RX` with a `linux/tls.h` crypto-info struct per direction. This
//! server sends no ticket and no KeyUpdate (see `tls::config`).
//!
//! The same hand-over serves the server's side (`server::kernel_tls`),
//! where READ data then goes out with sendfile(2) and the kernel encrypts
//! it: [`kernel_supports`] says beforehand whether the negotiated cipher
//! can be handed over, and [`record_sequence`] reads the kernel's record
//! counts back (the record limit, `tls::kernel_records`).
//!
//! nix wraps the three setsockopts with the libc structs of `linux/tls.h`,
//! and the unread-bytes check is a non-blocking `MSG_PEEK`. Reading the
//! counts back is `getsockopt(SOL_TLS, …)`, which nix does not wrap: the
//! one unsafe call of this crate, on plain-data structs of the exact size
//! the kernel checks. A kernel without the `tls` module refuses `TCP_ULP`
//! with ENOENT: [`KtlsError::Unavailable`] names the module.

use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo};
use nix::sys::socket::{MsgFlags, recv, setsockopt};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// The upper-layer protocol name that turns kernel TLS on for a socket.
pub const ULP_NAME: &[u8] = b"tls";

/// Why a session could not be handed to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error(
        "the kernel has no TLS support (setsockopt TCP_ULP \"tls\" failed with ENOENT): load the tls module (tls.ko, `modprobe tls`)"
    )]
    Unavailable,
    #[error("setsockopt {what}: {errno}")]
    Sockopt { what: &'static str, errno: Errno },
    #[error("the TLS session is not at rest ({0}): handing it to the kernel now would lose data")]
    NotAtRest(&'static str),
    #[error("cipher suite not supported by kernel TLS")]
    UnsupportedCipher,
    #[error("extracting the session's secrets: {0}")]
    Secrets(#[from] rustls::Error),
}

/// The kernel's parameters for one direction of a TLS 1.3 session: the
/// AEAD key, rustls' 12-byte IV (for AES-GCM the kernel takes its first 4
/// bytes as the salt and the other 8 as the IV; for ChaCha20-Poly1305 all
/// 12 as the IV) and the sequence number of the next record, big-endian.
pub fn crypto_info(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<TlsCryptoInfo, KtlsError> {
    let rec_seq = seq.to_be_bytes();
    Ok(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(libc::TLS_CIPHER_AES_GCM_128_SALT_SIZE);
            TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: sized(iv)?,
                key: sized(key.as_ref())?,
                salt: sized(salt)?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(libc::TLS_CIPHER_AES_GCM_256_SALT_SIZE);
            TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: sized(iv)?,
                key: sized(key.as_ref())?,
                salt: sized(salt)?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            TlsCryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: sized(iv.as_ref())?,
                key: sized(key.as_ref())?,
                salt: [],
                rec_seq,
            })
        }
        _ => return Err(KtlsError::UnsupportedCipher),
    })
}

/// Whether the kernel takes a session of this TLS 1.3 cipher suite (the
/// ones [`crypto_info`] converts).
pub fn kernel_supports(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as s;
    matches!(suite, s::TLS13_AES_128_GCM_SHA256 | s::TLS13_AES_256_GCM_SHA384 | s::TLS13_CHACHA20_POLY1305_SHA256)
}

/// The kernel's cipher number of an installed direction.
pub fn cipher_type(info: &TlsCryptoInfo) -> u16 {
    match info {
        TlsCryptoInfo::Aes128Gcm(i) => i.info.cipher_type,
        TlsCryptoInfo::Aes256Gcm(i) => i.info.cipher_type,
        TlsCryptoInfo::Chacha20Poly1305(i) => i.info.cipher_type,
    }
}

/// One direction of a kernel TLS socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Transmit,
    Receive,
}

/// The `linux/tls.h` structs `getsockopt(SOL_TLS)` fills: plain data
/// (integers and byte arrays), valid whatever bytes they hold.
trait CryptoInfoStruct: Copy {
    fn rec_seq(&self) -> [u8; 8];
}

impl CryptoInfoStruct for libc::tls12_crypto_info_aes_gcm_128 {
    fn rec_seq(&self) -> [u8; 8] {
        self.rec_seq
    }
}

impl CryptoInfoStruct for libc::tls12_crypto_info_aes_gcm_256 {
    fn rec_seq(&self) -> [u8; 8] {
        self.rec_seq
    }
}

impl CryptoInfoStruct for libc::tls12_crypto_info_chacha20_poly1305 {
    fn rec_seq(&self) -> [u8; 8] {
        self.rec_seq
    }
}

/// The sequence number of the next record in `direction` of a kernel TLS
/// socket whose keys are of `cipher` ([`cipher_type`]): the records sent
/// or received under those keys so far, rustls' ones before the hand-over
/// included.
pub fn record_sequence(socket: &impl AsFd, direction: Direction, cipher: u16) -> Result<u64, KtlsError> {
    let optname = match direction {
        Direction::Transmit => libc::TLS_TX,
        Direction::Receive => libc::TLS_RX,
    };
    let seq = match cipher {
        libc::TLS_CIPHER_AES_GCM_128 => get::<libc::tls12_crypto_info_aes_gcm_128>(socket, optname)?.rec_seq(),
        libc::TLS_CIPHER_AES_GCM_256 => get::<libc::tls12_crypto_info_aes_gcm_256>(socket, optname)?.rec_seq(),
        libc::TLS_CIPHER_CHACHA20_POLY1305 => {
            get::<libc::tls12_crypto_info_chacha20_poly1305>(socket, optname)?.rec_seq()
        }
        _ => return Err(KtlsError::UnsupportedCipher),
    };
    Ok(u64::from_be_bytes(seq))
}

/// `getsockopt(SOL_TLS, optname)` into a `T`, with `T`'s exact size as
/// optlen (a 6.1 kernel refuses any other with EINVAL).
#[allow(unsafe_code)]
fn get<T: CryptoInfoStruct>(socket: &impl AsFd, optname: libc::c_int) -> Result<T, KtlsError> {
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a writable buffer of `len` bytes that lives across
    // the call, and `len` a valid socklen_t; the kernel writes at most
    // `len` bytes to it and the new length to `len`.
    let rc = unsafe {
        libc::getsockopt(socket.as_fd().as_raw_fd(), libc::SOL_TLS, optname, value.as_mut_ptr().cast(), &mut len)
    };
    Errno::result(rc).map_err(|errno| KtlsError::Sockopt { what: "getsockopt SOL_TLS", errno })?;
    if len as usize != std::mem::size_of::<T>() {
        return Err(KtlsError::Sockopt { what: "getsockopt SOL_TLS (short struct)", errno: Errno::EINVAL });
    }
    // SAFETY: `T` is plain data (CryptoInfoStruct), so the zeroed bytes the
    // kernel overwrote, wholly as `len` says, are a valid `T`.
    Ok(unsafe { value.assume_init() })
}

fn info(cipher_type: u16) -> libc::tls_crypto_info {
    libc::tls_crypto_info { version: libc::TLS_1_3_VERSION, cipher_type }
}

/// `bytes` as an array of exactly `N`: a length rustls and the kernel
/// disagree on is refused, never truncated or padded.
fn sized<const N: usize>(bytes: &[u8]) -> Result<[u8; N], KtlsError> {
    bytes.try_into().map_err(|_| KtlsError::UnsupportedCipher)
}

/// Checks that nothing of the session is left in userspace or unread on
/// the socket: `plaintext_unread` and `tls_unsent` from rustls' I/O state
/// (`process_new_packets`), and a non-blocking peek at the socket.
pub fn check_at_rest(socket: &impl AsFd, plaintext_unread: usize, tls_unsent: usize) -> Result<(), KtlsError> {
    if plaintext_unread > 0 {
        return Err(KtlsError::NotAtRest("rustls holds plaintext not read yet"));
    }
    if tls_unsent > 0 {
        return Err(KtlsError::NotAtRest("rustls holds records not sent yet"));
    }
    let mut byte = [0u8; 1];
    match recv(socket.as_fd().as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Err(Errno::EAGAIN) => Ok(()),
        Ok(0) => Err(KtlsError::NotAtRest("the peer closed the connection")),
        Ok(_) => Err(KtlsError::NotAtRest("the socket holds bytes not read yet")),
        Err(errno) => Err(KtlsError::Sockopt { what: "recv(MSG_PEEK)", errno }),
    }
}

/// Turns kernel TLS on for `socket` (an established TCP connection).
pub fn enable(socket: &impl AsFd) -> Result<(), KtlsError> {
    match setsockopt(socket, TcpUlp::default(), &ULP_NAME) {
        Ok(()) => Ok(()),
        Err(Errno::ENOENT) => Err(KtlsError::Unavailable),
        Err(errno) => Err(KtlsError::Sockopt { what: "TCP_ULP \"tls\"", errno }),
    }
}

/// Installs both directions of `secrets` on `socket`, after [`enable`];
/// returns the kernel's cipher number ([`cipher_type`]).
pub fn install(socket: &impl AsFd, secrets: &ExtractedSecrets) -> Result<u16, KtlsError> {
    let (tx_seq, tx) = &secrets.tx;
    let (rx_seq, rx) = &secrets.rx;
    let (tx, rx) = (crypto_info(*tx_seq, tx)?, crypto_info(*rx_seq, rx)?);
    setsockopt(socket, TcpTlsTx, &tx).map_err(|errno| KtlsError::Sockopt { what: "SOL_TLS TLS_TX", errno })?;
    setsockopt(socket, TcpTlsRx, &rx).map_err(|errno| KtlsError::Sockopt { what: "SOL_TLS TLS_RX", errno })?;
    Ok(cipher_type(&tx))
}

/// Hands the client's TLS session on `stream` to the kernel, once the NBD
/// handshake is over (NBD_OPT_GO answered): checks that nothing is left in
/// userspace, extracts the secrets, turns kernel TLS on and installs both
/// directions. Returns the TCP socket, which encrypts and decrypts by
/// itself from now on.
pub fn into_kernel(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Result<tokio::net::TcpStream, KtlsError> {
    let (socket, mut session) = stream.into_inner();
    let state = session.process_new_packets()?;
    check_at_rest(&socket, state.plaintext_bytes_to_read(), state.tls_bytes_to_write())?;
    let secrets = session.dangerous_extract_secrets()?;
    enable(&socket)?;
    install(&socket, &secrets)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::crypto::CryptoProvider;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

    use super::*;

    /// The numbers of `linux/tls.h` and `linux/tcp.h` that kTLS takes, as
    /// the kernel headers define them, and the structs' exact sizes (the
    /// kernel checks optlen against them).
    #[test]
    fn kernel_numbers_and_struct_sizes_match_linux_tls_h() {
        assert_eq!(libc::SOL_TLS, 282);
        assert_eq!(libc::TCP_ULP, 31);
        assert_eq!((libc::TLS_TX, libc::TLS_RX), (1, 2));
        assert_eq!(libc::TLS_1_3_VERSION, 0x0304);
        assert_eq!(libc::TLS_CIPHER_AES_GCM_128, 51);
        assert_eq!(libc::TLS_CIPHER_AES_GCM_256, 52);
        assert_eq!(libc::TLS_CIPHER_CHACHA20_POLY1305, 54);
        assert_eq!(std::mem::size_of::<libc::tls_crypto_info>(), 4);
        // info (4) + iv + key + salt + rec_seq (8)
        assert_eq!(std::mem::size_of::<libc::tls12_crypto_info_aes_gcm_128>(), 4 + 8 + 16 + 4 + 8);
        assert_eq!(std::mem::size_of::<libc::tls12_crypto_info_aes_gcm_256>(), 4 + 8 + 32 + 4 + 8);
        assert_eq!(std::mem::size_of::<libc::tls12_crypto_info_chacha20_poly1305>(), 4 + 12 + 32 + 8);
        assert_eq!(ULP_NAME, b"tls");
    }

    /// A client and a server session run to the end in memory with `suite`,
    /// their secrets extracted as the node plugin would.
    fn sessions(suite: rustls::SupportedCipherSuite) -> (ExtractedSecrets, ExtractedSecrets) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap().der().clone();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
            (vec![cert.der().clone()], rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap())
        };
        let provider =
            Arc::new(CryptoProvider { cipher_suites: vec![suite], ..rustls::crypto::ring::default_provider() });
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert).unwrap();
        let roots = Arc::new(roots);
        let (server_chain, server_key) = leaf("server.test");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .unwrap();
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(server_chain, server_key)
            .unwrap();
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        let (client_chain, client_key) = leaf("node-1");
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(client_chain, client_key)
            .unwrap();
        client.enable_secret_extraction = true;
        let name = rustls_pki_types::ServerName::try_from("server.test").unwrap();
        let mut client = ClientConnection::new(Arc::new(client), name).unwrap();
        let mut server = ServerConnection::new(Arc::new(server)).unwrap();
        // Shuttle records both ways until both are done, then one
        // application record each way so the sequence numbers move.
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        use std::io::{Read, Write};
        client.writer().write_all(b"GO").unwrap();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        server.read_tls(&mut wire.as_slice()).unwrap();
        let state = server.process_new_packets().unwrap();
        let mut go = vec![0; state.plaintext_bytes_to_read()];
        server.reader().read_exact(&mut go).unwrap();
        assert_eq!(go, b"GO");
        (client.dangerous_extract_secrets().unwrap(), server.dangerous_extract_secrets().unwrap())
    }

    fn bytes(info: &TlsCryptoInfo) -> (u16, u16, Vec<u8>, Vec<u8>, Vec<u8>, [u8; 8]) {
        match info {
            TlsCryptoInfo::Aes128Gcm(i) => {
                (i.info.version, i.info.cipher_type, i.key.to_vec(), i.salt.to_vec(), i.iv.to_vec(), i.rec_seq)
            }
            TlsCryptoInfo::Aes256Gcm(i) => {
                (i.info.version, i.info.cipher_type, i.key.to_vec(), i.salt.to_vec(), i.iv.to_vec(), i.rec_seq)
            }
            TlsCryptoInfo::Chacha20Poly1305(i) => {
                (i.info.version, i.info.cipher_type, i.key.to_vec(), i.salt.to_vec(), i.iv.to_vec(), i.rec_seq)
            }
        }
    }

    /// What one side sends with is what the other receives with, for every
    /// suite the ring provider has: same key, salt and IV, and the sequence
    /// numbers of the records still to come (one application record each
    /// way was sent after the handshake here).
    #[test]
    fn each_sides_transmit_parameters_are_the_others_receive_parameters() {
        let suites = [
            (rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256, libc::TLS_CIPHER_AES_GCM_128, 16, 4),
            (rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384, libc::TLS_CIPHER_AES_GCM_256, 32, 4),
            (
                rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                libc::TLS_CIPHER_CHACHA20_POLY1305,
                32,
                0,
            ),
        ];
        for (suite, cipher, key_len, salt_len) in suites {
            let (client, server) = sessions(suite);
            let client_tx = bytes(&crypto_info(client.tx.0, &client.tx.1).unwrap());
            let server_rx = bytes(&crypto_info(server.rx.0, &server.rx.1).unwrap());
            let server_tx = bytes(&crypto_info(server.tx.0, &server.tx.1).unwrap());
            let client_rx = bytes(&crypto_info(client.rx.0, &client.rx.1).unwrap());
            assert_eq!(client_tx, server_rx, "{suite:?}: client to server");
            assert_eq!(server_tx, client_rx, "{suite:?}: server to client");
            assert_ne!(client_tx.2, server_tx.2, "each direction has its own key");
            let (version, cipher_type, key, salt, iv, _) = &client_tx;
            assert_eq!((*version, *cipher_type), (0x0304, cipher));
            assert_eq!((key.len(), salt.len(), salt.len() + iv.len()), (key_len, salt_len, 12));
            // The client sent one record (GO), the server none yet.
            assert_eq!(client.tx.0, 1);
            assert_eq!(client_tx.5, 1u64.to_be_bytes());
            assert_eq!(server_rx.5, 1u64.to_be_bytes());
            assert_eq!(server_tx.5, server.tx.0.to_be_bytes());
        }
    }

    #[test]
    fn rustls_iv_splits_into_salt_and_iv_for_aes_gcm() {
        let iv: [u8; 12] = std::array::from_fn(|i| i as u8);
        let key = rustls::crypto::cipher::AeadKey::from([7u8; 32]);
        let secrets = ConnectionTrafficSecrets::Aes256Gcm { key, iv: rustls::crypto::cipher::Iv::from(iv) };
        let (_, _, key, salt, iv_part, seq) = bytes(&crypto_info(0x0102_0304_0506_0708, &secrets).unwrap());
        assert_eq!(key, [7u8; 32]);
        assert_eq!(salt, [0, 1, 2, 3]);
        assert_eq!(iv_part, [4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(seq, [1, 2, 3, 4, 5, 6, 7, 8]);
        // A 32-byte key where AES-128 takes 16 is refused, not cut.
        let long = ConnectionTrafficSecrets::Aes128Gcm {
            key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
            iv: rustls::crypto::cipher::Iv::from(iv),
        };
        assert!(matches!(crypto_info(0, &long), Err(KtlsError::UnsupportedCipher)));
    }

    /// On a real established socket: the unread-bytes check sees a byte the
    /// peer sent, and without the kernel's tls module `enable` says which
    /// module is missing (this host has none; where it has one, the ULP
    /// goes on and that is fine too).
    #[test]
    fn at_rest_check_and_enable_on_a_real_socket() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        check_at_rest(&client, 0, 0).expect("nothing sent yet");
        assert!(matches!(check_at_rest(&client, 1, 0), Err(KtlsError::NotAtRest(_))));
        assert!(matches!(check_at_rest(&client, 0, 5), Err(KtlsError::NotAtRest(_))));
        server.write_all(b"x").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while check_at_rest(&client, 0, 0).is_ok() {
            assert!(std::time::Instant::now() < deadline, "the byte never arrived");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let err = check_at_rest(&client, 0, 0).unwrap_err();
        assert!(err.to_string().contains("not read yet"), "{err}");
        client.read_exact(&mut [0u8; 1]).unwrap();
        check_at_rest(&client, 0, 0).expect("read now");
        match enable(&client) {
            Err(KtlsError::Unavailable) => {
                let message = KtlsError::Unavailable.to_string();
                assert!(message.contains("tls.ko") && message.contains("modprobe tls"), "{message}");
            }
            Ok(()) => {}
            Err(other) => panic!("unexpected: {other}"),
        }
    }
}
