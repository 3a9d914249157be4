//! A small NBD client: fixed-newstyle handshake with `OPT_GO`, simple replies, one request at a
//! time. The end-to-end tests drive a guest's writes through QEMU's own NBD export with it, and
//! the benchmarks measure per-request latency with it. Replies are checked against the request's
//! cookie; every length from the server is bounded before use.

use crate::proto::*;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("server is not an NBD fixed-newstyle server")]
    NotNbd,
    #[error("server refused option {option}: reply type {reply:#x}")]
    Refused { option: u32, reply: u32 },
    #[error("server reply is malformed: {0}")]
    Protocol(&'static str),
    #[error("server answered the request with error {0}")]
    Errno(u32),
}

type Result<T> = std::result::Result<T, ClientError>;

pub struct Client<S> {
    stream: S,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl Client<tokio::net::TcpStream> {
    pub async fn connect_tcp(addr: &str, export: &str) -> Result<Self> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Client::handshake(s, export).await
    }
}

impl Client<tokio::net::UnixStream> {
    pub async fn connect_unix(path: &std::path::Path, export: &str) -> Result<Self> {
        Client::handshake(tokio::net::UnixStream::connect(path).await?, export).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Negotiate `export` with `OPT_GO`.
    pub async fn handshake(mut stream: S, export: &str) -> Result<Self> {
        if stream.read_u64().await? != NBDMAGIC || stream.read_u64().await? != IHAVEOPT {
            return Err(ClientError::NotNbd);
        }
        let server_flags = stream.read_u16().await?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::NotNbd);
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        stream.write_u32(cflags).await?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        stream.write_u64(IHAVEOPT).await?;
        stream.write_u32(OPT_GO).await?;
        stream.write_u32(data.len() as u32).await?;
        stream.write_all(&data).await?;
        stream.flush().await?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            if stream.read_u64().await? != OPT_REPLY_MAGIC {
                return Err(ClientError::Protocol("option reply magic"));
            }
            let option = stream.read_u32().await?;
            let reply = stream.read_u32().await?;
            let len = stream.read_u32().await?;
            if option != OPT_GO || len > MAX_OPTION_LEN {
                return Err(ClientError::Protocol("option reply"));
            }
            let mut payload = vec![0u8; len as usize];
            stream.read_exact(&mut payload).await?;
            match reply {
                REP_ACK => break,
                REP_INFO if payload.len() >= 12 && payload[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().expect("8")));
                    flags = u16::from_be_bytes(payload[10..12].try_into().expect("2"));
                }
                REP_INFO => {}
                r => return Err(ClientError::Refused { option, reply: r }),
            }
        }
        let size = size.ok_or(ClientError::Protocol("no export information"))?;
        Ok(Client {
            stream,
            size,
            flags,
            cookie: 0,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    async fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.stream.write_all(&h).await?;
        self.stream.flush().await?;
        Ok(self.cookie)
    }

    async fn reply(&mut self, cookie: u64) -> Result<()> {
        if self.stream.read_u32().await? != SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol("reply magic"));
        }
        let err = self.stream.read_u32().await?;
        if self.stream.read_u64().await? != cookie {
            return Err(ClientError::Protocol("reply cookie"));
        }
        if err != 0 {
            return Err(ClientError::Errno(err));
        }
        Ok(())
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        if data.len() > MAX_PAYLOAD as usize {
            return Err(ClientError::Protocol("write larger than the payload limit"));
        }
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let c = self
            .request(CMD_WRITE, flags, offset, data.len() as u32, data)
            .await?;
        self.reply(c).await
    }

    pub async fn flush(&mut self) -> Result<()> {
        let c = self.request(CMD_FLUSH, 0, 0, 0, &[]).await?;
        self.reply(c).await
    }

    pub async fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<()> {
        let c = self.request(CMD_WRITE_ZEROES, 0, offset, len, &[]).await?;
        self.reply(c).await
    }

    pub async fn trim(&mut self, offset: u64, len: u32) -> Result<()> {
        let c = self.request(CMD_TRIM, 0, offset, len, &[]).await?;
        self.reply(c).await
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        if len > MAX_PAYLOAD {
            return Err(ClientError::Protocol("read larger than the payload limit"));
        }
        let c = self.request(CMD_READ, 0, offset, len, &[]).await?;
        self.reply(c).await?;
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf).await?;
        Ok(buf)
    }

    /// Say goodbye (`NBD_CMD_DISC`); the server closes without a reply.
    pub async fn disconnect(mut self) -> Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[]).await?;
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemExport, ServerConfig};
    use std::collections::HashMap;
    use std::sync::Arc;

    #[tokio::test]
    async fn client_talks_to_our_server() {
        let mem = Arc::new(MemExport::new(1 << 20));
        let mut exports: HashMap<String, Arc<dyn crate::Export>> = HashMap::new();
        exports.insert("m".into(), mem.clone());
        let cfg = Arc::new(ServerConfig {
            exports,
            tls: None,
            require_tls: false,
        });
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(crate::serve_connection(a, cfg));
        let mut c = Client::handshake(b, "m").await.unwrap();
        assert_eq!(c.size(), 1 << 20);
        c.write(4096, &[7; 5000], false).await.unwrap();
        c.write(100, &[1; 3], true).await.unwrap();
        c.flush().await.unwrap();
        c.write_zeroes(4096, 1000).await.unwrap();
        assert_eq!(
            c.read(4096, 5000).await.unwrap()[..1001],
            [[0u8; 1000].as_slice(), &[7]].concat()
        );
        assert!(matches!(
            c.write((1 << 20) - 1, &[1, 2], false).await,
            Err(ClientError::Errno(_))
        ));
        assert_eq!(c.read(100, 3).await.unwrap(), vec![1; 3]);
        c.disconnect().await.unwrap();
        assert_eq!(mem.contents()[100..103], [1, 1, 1]);
    }
}
