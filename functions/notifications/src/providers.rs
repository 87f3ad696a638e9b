//! The delivery providers as the notifications use them: the providers themselves (email
//! over SMTP, SMS and push through SNS) and their configuration live in
//! [`inkwire_shared::providers`] (the workflows' email and SMS actions use them too); this
//! module adds [`Providers`], which says for each external delivery channel either "here is
//! the provider" or why the channel is skipped, and [`configured`], the notifier's view.

use std::fmt;
use std::sync::Arc;

pub use inkwire_shared::config::ConfigError;
pub use inkwire_shared::providers::*;

use crate::model::DeliveryChannel;

/// Which channels have a provider, as the notifier's plan needs to know (a channel without
/// one is `skipped_no_address`).
pub fn configured(config: &ProviderConfig) -> crate::plan::Providers {
    crate::plan::Providers {
        email: config.smtp_url.is_some(),
        sms: config.sns_enabled,
        push: config.sns_enabled,
    }
}

/// The configured providers. A channel without one is skipped with
/// [`Providers::skip_reason`], never an error.
#[derive(Clone, Default)]
pub struct Providers {
    pub email: Option<Arc<EmailProvider>>,
    pub sns: Option<Arc<SnsProvider>>,
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Providers")
            .field("email", &self.email.is_some())
            .field("sns", &self.sns.is_some())
            .finish()
    }
}

impl Providers {
    /// Builds every configured provider (one SMTP transport and one SNS client, reused for
    /// every send). Fails only on configuration that cannot work (an address lettre refuses);
    /// unset providers are `None`.
    pub async fn build(config: &ProviderConfig) -> Result<Providers, ConfigError> {
        let email = match &config.smtp_url {
            Some(_) => Some(Arc::new(EmailProvider::new(config)?)),
            None => None,
        };
        let sns = if config.sns_enabled {
            Some(Arc::new(SnsProvider::new(config).await))
        } else {
            None
        };
        let providers = Providers { email, sns };
        for channel in DeliveryChannel::EXTERNAL {
            if let Some(reason) = providers.skip_reason(channel) {
                tracing::info!(channel = channel.as_str(), reason, "channel skipped");
            }
        }
        Ok(providers)
    }

    /// Why `channel` cannot be delivered by this process, or `None` when it can. The delivery
    /// log records the reason with status `skipped_no_address`.
    pub fn skip_reason(&self, channel: DeliveryChannel) -> Option<&'static str> {
        match channel {
            DeliveryChannel::InApp => None,
            DeliveryChannel::Email if self.email.is_none() => {
                Some("email provider not configured (INKWIRE_SMTP_URL is not set)")
            }
            DeliveryChannel::Sms if self.sns.is_none() => Some(
                "SMS provider not configured (SNS is off: set INKWIRE_SNS_ENABLED, \
                 INKWIRE_SNS_ENDPOINT or INKWIRE_SNS_PLATFORM_APPLICATION_ARN)",
            ),
            DeliveryChannel::Push if self.sns.is_none() => Some(
                "push provider not configured (SNS is off: set \
                 INKWIRE_SNS_PLATFORM_APPLICATION_ARN)",
            ),
            DeliveryChannel::Email | DeliveryChannel::Sms | DeliveryChannel::Push => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unconfigured_providers_are_none_and_say_why() {
        let providers = Providers::build(&ProviderConfig::default()).await.unwrap();
        assert!(providers.email.is_none() && providers.sns.is_none());
        assert_eq!(providers.skip_reason(DeliveryChannel::InApp), None);
        for channel in DeliveryChannel::EXTERNAL {
            let reason = providers.skip_reason(channel).unwrap();
            assert!(reason.contains("not configured"), "{reason}");
        }
        assert!(
            providers
                .skip_reason(DeliveryChannel::Email)
                .unwrap()
                .contains("INKWIRE_SMTP_URL")
        );
    }
}
