//! A deliberately small NBD server for the real-kernel tests: serves an
//! in-memory disk and advertises exactly the transmission flags it is given,
//! e.g. SEND_CACHE (bit 10) without CAN_MULTI_CONN (bit 8), as a server with
//! a per-connection cache would. Fixed newstyle; OPT_GO (INFO_EXPORT only)
//! and OPT_EXPORT_NAME; READ, WRITE, FLUSH, TRIM, DISC with simple replies.
//!
//! Usage: flag-server --listen 127.0.0.1:10811 --size 67108864 --flags 0x040d

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use nbd::HandshakeFlags;
use nbd::consts::{cmd, info, magic, opt, rep};

fn read_u32(s: &mut TcpStream) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn reply_opt(s: &mut TcpStream, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&magic::OPTION_REPLY.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&reply.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

fn serve(mut s: TcpStream, disk: Arc<Mutex<Vec<u8>>>, flags: u16) -> io::Result<()> {
    let size = disk.lock().unwrap().len() as u64;
    let mut hello = Vec::new();
    hello.extend_from_slice(&magic::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&magic::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES).bits().to_be_bytes());
    s.write_all(&hello)?;
    let client_flags = read_u32(&mut s)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
        let mut data = vec![0; len.min(1 << 16)];
        s.read_exact(&mut data)?;
        let mut export = Vec::new();
        export.extend_from_slice(&size.to_be_bytes());
        export.extend_from_slice(&flags.to_be_bytes());
        match option {
            opt::GO => {
                let mut payload = info::EXPORT.to_be_bytes().to_vec();
                payload.extend_from_slice(&export);
                reply_opt(&mut s, option, rep::INFO, &payload)?;
                reply_opt(&mut s, option, rep::ACK, &[])?;
                break;
            }
            opt::EXPORT_NAME => {
                s.write_all(&export)?;
                if client_flags & 2 == 0 {
                    s.write_all(&[0; 124])?;
                }
                break;
            }
            opt::ABORT => return Ok(()),
            _ => reply_opt(&mut s, option, rep::ERR_UNSUP, &[])?,
        }
    }
    loop {
        let mut r = [0u8; 28];
        s.read_exact(&mut r)?;
        let kind = u16::from_be_bytes([r[6], r[7]]);
        let cookie = &r[8..16];
        let offset = u64::from_be_bytes(r[16..24].try_into().unwrap()) as usize;
        let length = u32::from_be_bytes(r[24..28].try_into().unwrap()) as usize;
        let in_range = offset.checked_add(length).is_some_and(|end| end as u64 <= size);
        let mut payload = Vec::new();
        let mut error = if in_range { 0u32 } else { 22 };
        match kind {
            cmd::WRITE => {
                let mut data = vec![0; length];
                s.read_exact(&mut data)?;
                if in_range {
                    disk.lock().unwrap()[offset..offset + length].copy_from_slice(&data);
                }
            }
            cmd::READ if in_range => payload = disk.lock().unwrap()[offset..offset + length].to_vec(),
            cmd::TRIM | cmd::FLUSH | cmd::READ => {}
            cmd::DISC => return Ok(()),
            _ => error = 22,
        }
        let mut m = Vec::with_capacity(16 + payload.len());
        m.extend_from_slice(&magic::SIMPLE_REPLY.to_be_bytes());
        m.extend_from_slice(&error.to_be_bytes());
        m.extend_from_slice(cookie);
        if error == 0 {
            m.extend_from_slice(&payload);
        }
        s.write_all(&m)?;
    }
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let listen = arg("--listen").unwrap_or_else(|| "127.0.0.1:10811".into());
    let size: usize = arg("--size").map_or(64 << 20, |v| v.parse().expect("--size"));
    let flags =
        arg("--flags").map_or(0x040d, |v| u16::from_str_radix(v.trim_start_matches("0x"), 16).expect("--flags"));
    let disk = Arc::new(Mutex::new(vec![0u8; size]));
    let listener = TcpListener::bind(&listen)?;
    eprintln!("flag-server on {listen}, flags {flags:#06x}");
    for conn in listener.incoming() {
        let (conn, disk) = (conn?, Arc::clone(&disk));
        std::thread::spawn(move || serve(conn, disk, flags));
    }
    Ok(())
}
