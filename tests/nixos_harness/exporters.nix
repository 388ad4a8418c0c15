# services.prometheus.exporters with the structure of nixpkgs'
# nixos/modules/services/monitoring/prometheus/exporters.nix: ONE option of a
# submodule type, whose options are one submodule-typed option per exporter
# (enable, port, listenAddress, extraFlags, openFirewall, firewallFilter,
# firewallRules, user, group, plus the exporter's own options), which imports
# assertions.nix; the top level collects per-exporter assertions and the
# submodule's own assertions/warnings, and every enabled exporter becomes a
# hardened `prometheus-<name>-exporter` service. The node exporter's options
# and ExecStart follow exporters/node.nix. Left out: the firewall and
# users/groups definitions (no option of those is read by module.nix) and
# exporters other than node, nginx and systemd.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types;
  cfg = config.services.prometheus.exporters;

  exporterOpts = {
    node = {
      port = 9100;
      extraOpts = {
        enabledCollectors = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Collectors enabled in addition to the defaults.";
        };
        disabledCollectors = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Default collectors to disable.";
        };
      };
      serviceOpts = conf: {
        serviceConfig = {
          DynamicUser = false;
          RuntimeDirectory = "prometheus-node-exporter";
          ExecStart = ''
            ${pkgs.prometheus-node-exporter}/bin/node_exporter \
              ${lib.concatMapStringsSep " " (x: "--collector." + x) conf.enabledCollectors} \
              ${lib.concatMapStringsSep " " (x: "--no-collector." + x) conf.disabledCollectors} \
              --web.listen-address ${conf.listenAddress}:${toString conf.port} ${lib.concatStringsSep " " conf.extraFlags}
          '';
          ProtectHome = true;
        };
      };
    };
    nginx = {
      port = 9113;
      extraOpts.scrapeUri = mkOption {
        type = types.str;
        default = "http://localhost/nginx_status";
        description = "Where to scrape nginx' status.";
      };
      serviceOpts = conf: {
        serviceConfig.ExecStart = "${pkgs.coreutils}/bin/true ${conf.scrapeUri}";
      };
    };
    systemd = {
      port = 9558;
      extraOpts = { };
      serviceOpts = conf: { serviceConfig.ExecStart = "${pkgs.coreutils}/bin/true"; };
    };
  };

  mkExporterOpts =
    { name, port }:
    {
      enable = lib.mkEnableOption "the prometheus ${name} exporter";
      port = mkOption {
        type = types.port;
        default = port;
        description = "Port to listen on.";
      };
      listenAddress = mkOption {
        type = types.str;
        default = "0.0.0.0";
        description = "Address to listen on.";
      };
      extraFlags = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Extra command line options of the ${name} exporter.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the port in the firewall.";
      };
      firewallFilter = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "iptables filter used with openFirewall.";
      };
      firewallRules = mkOption {
        type = types.nullOr types.lines;
        default = null;
        description = "nftables rules used with openFirewall.";
      };
      user = mkOption {
        type = types.str;
        default = "${name}-exporter";
        description = "User of the exporter.";
      };
      group = mkOption {
        type = types.str;
        default = "${name}-exporter";
        description = "Group of the exporter.";
      };
    };

  exporterSubmodule =
    name: opts:
    mkOption {
      type = types.submodule [
        { options = mkExporterOpts { inherit name; inherit (opts) port; } // opts.extraOpts; }
        (
          { config, ... }:
          lib.mkIf config.openFirewall {
            firewallFilter = lib.mkDefault "-p tcp -m tcp --dport ${toString config.port}";
            firewallRules = lib.mkDefault ''tcp dport ${toString config.port} accept comment "${name}-exporter"'';
          }
        )
      ];
      internal = true;
      default = { };
      description = "The ${name} exporter.";
    };

  mkExporterConf =
    name: opts:
    let
      conf = cfg.${name};
    in
    lib.mkIf conf.enable {
      systemd.services."prometheus-${name}-exporter" = lib.mkMerge [
        {
          wantedBy = [ "multi-user.target" ];
          after = [ "network.target" ];
          serviceConfig.Restart = lib.mkDefault "always";
          serviceConfig.PrivateTmp = lib.mkDefault true;
          serviceConfig.DynamicUser = lib.mkDefault true;
          serviceConfig.User = lib.mkDefault conf.user;
          serviceConfig.Group = conf.group;
          serviceConfig.ProtectSystem = lib.mkDefault "strict";
          serviceConfig.NoNewPrivileges = true;
          serviceConfig.UMask = "0077";
        }
        (opts.serviceOpts conf)
      ];
    };
in
{
  options.services.prometheus.exporters = mkOption {
    type = types.submodule {
      options = lib.mapAttrs exporterSubmodule exporterOpts;
      imports = [ ./assertions.nix ];
    };
    default = { };
    description = "Prometheus exporter configuration.";
  };

  config = lib.mkMerge (
    [
      {
        assertions =
          map (exporter: {
            assertion = cfg.${exporter}.firewallFilter != null -> cfg.${exporter}.openFirewall;
            message = "The `firewallFilter'-option of exporter ${exporter} doesn't have any effect unless `openFirewall' is set to `true'!";
          }) (lib.attrNames exporterOpts)
          ++ cfg.assertions;
        warnings = cfg.warnings;
      }
    ]
    ++ lib.mapAttrsToList mkExporterConf exporterOpts
  );
}
