//! Email over SMTP with lettre: one pooled async transport built from `INKWIRE_SMTP_URL`,
//! messages as `multipart/alternative` (text + HTML) or plain text, each send bounded by a
//! timeout, and SMTP failures classified into [`SendError::Transient`] (peer down, slow, 4xx)
//! and [`SendError::Permanent`] (5xx such as a rejected recipient, an unparsable address).

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::Error as SmtpError;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::ConfigError;

use super::{ProviderConfig, SendError, Sent, error_chain};

/// Sends notification emails. Built once; the transport keeps a small connection pool, so
/// consecutive sends reuse a connection (checked with NOOP before each reuse).
pub struct EmailProvider {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// The domain of `Message-ID`s, from the sender's address.
    id_domain: String,
    timeout: Duration,
}

impl std::fmt::Debug for EmailProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The transport's Debug would show the credentials.
        f.debug_struct("EmailProvider")
            .field("from", &self.from.to_string())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Whether lettre can build a transport from `url` (scheme, host, `tls=` value).
pub(crate) fn check_smtp_url(url: &str) -> Result<(), String> {
    let url = url.trim();
    if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
        return Err("must start with smtp:// or smtps://".into());
    }
    AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
        .map(|_| ())
        // lettre's message names the scheme and the tls parameter, never the password.
        .map_err(|e| e.to_string())
}

pub(crate) fn parse_mailbox(address: &str) -> Result<Mailbox, String> {
    address
        .trim()
        .parse::<Mailbox>()
        .map_err(|e| format!("{address:?} is not an email address: {e}"))
}

impl EmailProvider {
    /// The provider for `config.smtp_url`, which must be set. Call it inside a tokio
    /// runtime: the connection pool spawns its idle-connection reaper.
    pub fn new(config: &ProviderConfig) -> Result<EmailProvider, ConfigError> {
        let url = config.smtp_url.as_deref().ok_or_else(|| ConfigError {
            name: "INKWIRE_SMTP_URL",
            problem: "not set".into(),
        })?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.trim())
            .map_err(|e| ConfigError {
                name: "INKWIRE_SMTP_URL",
                problem: e.to_string(),
            })?
            // Bounds each network step (connect, every command); the whole send is bounded
            // again in `send`.
            .timeout(Some(config.smtp_timeout))
            .build();
        let from = parse_mailbox(&config.email_from).map_err(|problem| ConfigError {
            name: "INKWIRE_EMAIL_FROM",
            problem,
        })?;
        let id_domain = from.email.domain().to_string();
        Ok(EmailProvider {
            transport,
            from,
            id_domain,
            timeout: config.smtp_timeout,
        })
    }

    /// Sends one email to `to`: `multipart/alternative` with the text and the HTML when
    /// `html` is given, plain text otherwise. The provider message id is the `Message-ID`
    /// set here (angle brackets included), so a reply or bounce can be matched to it.
    pub async fn send(
        &self,
        to: &str,
        subject: &str,
        text: &str,
        html: Option<&str>,
    ) -> Result<Sent, SendError> {
        let (message, message_id) = self.build_message(to, subject, text, html)?;
        match tokio::time::timeout(self.timeout, self.transport.send(message)).await {
            Ok(Ok(_response)) => Ok(Sent {
                provider_message_id: Some(message_id),
            }),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(SendError::Transient(format!(
                "SMTP send timed out after {:?}",
                self.timeout
            ))),
        }
    }
}

impl EmailProvider {
    /// The message and its `Message-ID`. The subject comes from templates filled with
    /// caller data: lettre already encodes line breaks (RFC 2047), so none can start a header
    /// of its own; they become spaces here too, so the reader sees one line.
    fn build_message(
        &self,
        to: &str,
        subject: &str,
        text: &str,
        html: Option<&str>,
    ) -> Result<(Message, String), SendError> {
        let to = parse_mailbox(to).map_err(SendError::Permanent)?;
        let message_id = format!("<{}@{}>", uuid::Uuid::now_v7(), self.id_domain);
        let subject: String = subject
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
            .collect();
        let builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(message_id.clone()))
            .date_now();
        let message = match html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(
                text.to_string(),
                html.to_string(),
            )),
            None => builder.singlepart(SinglePart::plain(text.to_string())),
        }
        .map_err(|e| SendError::Permanent(format!("the email cannot be built: {e}")))?;
        Ok((message, message_id))
    }
}

/// SMTP reply codes decide where the server said something (RFC 5321 §4.2.1: 4yz transient,
/// 5yz permanent). Without a reply, a failure to reach or talk to the server is transient
/// (it may be back soon); lettre refusing our own request is permanent.
fn classify(e: &SmtpError) -> SendError {
    let text = describe(e);
    if e.is_permanent() {
        SendError::Permanent(text)
    } else if e.is_transient() || e.is_timeout() {
        SendError::Transient(text)
    } else if e.is_client() {
        SendError::Permanent(text)
    } else {
        // Connection refused or reset, TLS handshake, an unparsable reply, a pool shut down.
        SendError::Transient(text)
    }
}

/// lettre's message with its causes ("Connection error: Connection refused (os error 111)").
fn describe(e: &SmtpError) -> String {
    format!("SMTP: {}", error_chain(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls_lettre_understands() {
        for ok in [
            "smtp://127.0.0.1:2525",
            "smtp://mail.example.com:587?tls=required",
            "smtp://mail.example.com?tls=opportunistic",
            "smtps://user:p%40ss@mail.example.com",
            "smtp://127.0.0.1:2525/client.example.com",
        ] {
            assert_eq!(check_smtp_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "mail.example.com:25",
            "https://mail.example.com",
            "smtp://mail.example.com?tls=always",
            "smtp://",
        ] {
            assert!(check_smtp_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn message_ids_use_the_senders_domain() {
        let config = ProviderConfig {
            smtp_url: Some("smtp://127.0.0.1:1".into()),
            email_from: "Ink <ink@books.example>".into(),
            ..ProviderConfig::default()
        };
        let provider = EmailProvider::new(&config).unwrap();
        assert_eq!(provider.id_domain, "books.example");
        let shown = format!("{provider:?}");
        assert!(shown.contains("ink@books.example"), "{shown}");
    }

    #[tokio::test]
    async fn a_subject_cannot_add_headers() {
        let config = ProviderConfig {
            smtp_url: Some("smtp://127.0.0.1:1".into()),
            ..ProviderConfig::default()
        };
        let provider = EmailProvider::new(&config).unwrap();
        let (message, id) = provider
            .build_message(
                "ada@example.com",
                "Hello\r\nBcc: eve@example.com\nX-Evil: 1",
                "body",
                None,
            )
            .unwrap();
        let raw = String::from_utf8(message.formatted()).unwrap();
        let headers = &raw[..raw.find("\r\n\r\n").unwrap()];
        for line in headers.lines() {
            assert!(
                !line.starts_with("Bcc:") && !line.starts_with("X-Evil:"),
                "{headers}"
            );
        }
        assert!(headers.contains(&format!("Message-ID: {id}")), "{headers}");
        assert_eq!(message.envelope().to().len(), 1);
    }

    #[tokio::test]
    async fn an_unparsable_recipient_is_permanent_before_any_connection() {
        // Port 1 on loopback: were a connection tried, the error would be transient.
        let config = ProviderConfig {
            smtp_url: Some("smtp://127.0.0.1:1".into()),
            ..ProviderConfig::default()
        };
        let provider = EmailProvider::new(&config).unwrap();
        for to in ["not an address", "a@b@c", "", "<>"] {
            let err = provider.send(to, "s", "t", None).await.unwrap_err();
            assert!(matches!(err, SendError::Permanent(_)), "{to:?}: {err:?}");
        }
    }
}
