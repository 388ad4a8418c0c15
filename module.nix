# NixOS module for nixos-autodeploy: `system.autoDeploy`.
#
# Usage (without flakes): imports = [ /path/to/nixos-autodeploy/module.nix ];
# With flakes: imports = [ inputs.nixos-autodeploy.nixosModules.default ];
{
  config,
  options,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    optional
    optionals
    types
    ;

  cfg = config.system.autoDeploy;

  defaultStateDir = "/var/lib/nixos-autodeploy";
  unitName = "nixos-autodeploy.service";
  # Name of the systemd credential holding the bearer token; the agent reads
  # it from $CREDENTIALS_DIRECTORY/<name> (the `%d` specifier).
  tokenCredential = "token";
  # A list, not a string: nixpkgs' unit options (nixos/lib/systemd-unit-options.nix,
  # `unitOption`, since NixOS/nixpkgs#290946 in 26.05 and 26.11) concatenate
  # every definition into a list as soon as one of them is a list, while two
  # different strings conflict. As a list, a user's own credential merges
  # with ours whether the user writes it as a string or as a list.
  tokenCredentials = [ "${tokenCredential}:${cfg.tokenFile}" ];

  # An absolute path given as a *string*, so that it is never copied into the
  # world-readable Nix store: a Nix path literal (./token) is rejected instead
  # of being silently imported. `types.externalPath` is recent; fall back on
  # older nixpkgs.
  externalPathType =
    if types ? externalPath then
      types.externalPath
    else if types ? pathWith then
      types.pathWith {
        absolute = true;
        inStore = false;
      }
    else
      types.strMatching "/.*";

  # The state directory: an absolute path, given as a string, that names one
  # directory of its own. A trailing slash or whitespace would break the
  # tmpfiles rule and `StateDirectory=`; `/` and `/var/lib` would hand the
  # agent (and its 0700 mode) a directory shared with everything else.
  stateDirType =
    types.addCheck types.str (
      s:
      builtins.match "(/[^/[:space:]]+)+" s != null
      && !(lib.elem s [
        "/var/lib"
        "/var"
        "/run"
        "/nix"
        "/nix/store"
      ])
      && !(lib.any (seg: seg == "." || seg == "..") (lib.splitString "/" s))
    )
    // {
      name = "stateDir";
      description = "absolute directory path without trailing slash, whitespace, `.` or `..` (not `/`, `/var`, `/var/lib`, `/run`, `/nix`)";
    };

  # --- The node exporter's textfile directories -------------------------------
  #
  # Since node_exporter 1.9 `--collector.textfile.directory` may be repeated
  # (collector/textfile.go reads it with kingpin's `.Strings()`,
  # prometheus/node_exporter#3135); nixpkgs 26.05 and 26.11 ship 1.9 or later.
  # So the agent gets a directory of its own next to any the host already
  # has, and the wiring never has to take over (or argue with) the host's.
  # What it must not do: pass a directory the host already passes (the same
  # files read twice are duplicate metrics, and the scrape fails), or add the
  # `textfile` collector when the host lists it already (kingpin refuses a
  # repeated boolean flag and the exporter restarts forever), or wire
  # anything when the host disabled the collector (the NixOS manual's own
  # exporter example does). Those facts cannot be read from
  # config.services.prometheus.exporters.node: our own definitions of its
  # options would depend on their values (infinite recursion). Instead we
  # read the other modules' definitions of `services.prometheus.exporters`
  # (the option is one submodule; see nixpkgs'
  # nixos/modules/services/monitoring/prometheus/exporters.nix), looking
  # through mkIf/mkMerge/mkOverride/mkOrder. Warnings below check the merged
  # result, so a definition this cannot see (a function module) is
  # explained, never an evaluation error for a user who did not ask for the
  # wiring.
  ownFile = toString ./module.nix;
  # One level of a definition as the module system takes it at an option
  # (nixpkgs lib/modules.nix: dischargeProperties, then filterOverrides):
  # mkIf/mkMerge discharged, mkOrder looked through, and the priority of the
  # outermost mkOverride (null: a plain definition).
  defsAt =
    prio: v:
    if !builtins.isAttrs v then
      [ { inherit prio; value = v; } ]
    else if (v._type or null) == "if" then
      (if v.condition then defsAt prio v.content else [ ])
    else if (v._type or null) == "merge" then
      lib.concatMap (defsAt prio) v.contents
    else if (v._type or null) == "override" then
      defsAt (if prio == null then v.priority else prio) v.content
    else if (v._type or null) == "order" then
      defsAt prio v.content
    else
      [ { inherit prio; value = v; } ];
  fieldOf =
    name:
    lib.concatMap (
      d:
      if builtins.isAttrs d.value && !(d.value ? _type) && d.value ? ${name} then defsAt null d.value.${name} else [ ]
    );
  # Only the definitions of the highest priority are merged; a plain
  # definition of ours would throw away the host's mkDefault ones (a shared
  # profile's `extraFlags = lib.mkDefault [ ... ]`, or a whole
  # `node = lib.mkDefault { enable = true; ... }`, the exporter with it).
  # So ours join the others' priority when theirs is weaker than a plain
  # definition, and stay plain otherwise (a mkForce of the host wins, and a
  # warning says what is not wired).
  defaultPrio = lib.modules.defaultOverridePriority or 100;
  prioOf = d: if d.prio == null then defaultPrio else d.prio;
  highestPrio = lib.foldl' (m: d: lib.min m (prioOf d)) 9999;
  winning = defs: lib.filter (d: prioOf d == highestPrio defs) defs;
  joinPrio = defs: if defs == [ ] then defaultPrio else lib.max defaultPrio (highestPrio defs);
  # (definitionsWithLocations are the exporters option's winning definitions,
  # their own mkOverride already stripped.)
  otherNodeDefs = fieldOf "node" (
    lib.concatMap (d: defsAt null d.value) (
      lib.filter (d: d.file != ownFile) (options.services.prometheus.exporters.definitionsWithLocations or [ ])
    )
  );
  otherNodeField = name: fieldOf name (winning otherNodeDefs);
  otherNodeList =
    name: lib.concatMap (d: if builtins.isList d.value then d.value else [ ]) (winning (otherNodeField name));
  # nixpkgs joins extraFlags with spaces into ExecStart (exporters/node.nix),
  # so "--collector.textfile.directory /dir" in one element is two words to
  # node_exporter: split the elements the way systemd will.
  flagWords = lib.concatMap (f: lib.filter (w: builtins.isString w && w != "") (builtins.split "[[:space:]]+" f));
  # "/dir/" and "/dir" are one directory to node_exporter, read twice when
  # passed in both spellings (every metric twice: failed scrapes).
  normDir = d: if d != "/" && lib.hasSuffix "/" d then normDir (lib.removeSuffix "/" d) else d;
  textfileDirsIn =
    flags0:
    let
      flags = flagWords flags0;
    in
    map normDir (lib.concatLists (
      lib.imap0 (
        i: f:
        if lib.hasPrefix "--collector.textfile.directory=" f then
          [ (lib.removePrefix "--collector.textfile.directory=" f) ]
        else if f == "--collector.textfile.directory" && i + 1 < lib.length flags then
          [ (lib.elemAt flags (i + 1)) ]
        else
          [ ]
      ) flags
    ));
  existingTextfileDirs = textfileDirsIn (otherNodeList "extraFlags");
  textfileDisabled = lib.elem "textfile" (otherNodeList "disabledCollectors");
  # The wiring as it can happen: asked for (by default: the exporter is on)
  # and the host has not turned the textfile collector off.
  wire = cfg.enable && cfg.wireNodeExporter && !textfileDisabled;
  wireFlag = wire && !(lib.elem (normDir cfg.textfileDirectory) existingTextfileDirs);
  defaultTextfileDirectory = "/var/lib/prometheus-node-exporter-text";
  nodeExporterVersion = pkgs.prometheus-node-exporter.version or null;
  # systemd expands %-specifiers in Environment= values: the operator's
  # values (a proxy password with %40 in it) are meant literally.
  unitEnvironment = lib.mapAttrs (_: v: lib.replaceStrings [ "%" ] [ "%%" ] (toString v)) cfg.environment;
  # What the agent's unit and the boot check's share.
  agentUnitBase = {
    wants = [ "network-online.target" ];
    after = [ "network-online.target" ];
    # What health checks and hooks may call (NixOS adds coreutils, findutils,
    # gnugrep, gnused and systemd), and e.g. proxy variables.
    inherit (cfg) path;
    environment = unitEnvironment;
    # The agent may be the one running the activation that changes this
    # unit: never restart it from switch-to-configuration, and do not stop
    # it when a new configuration drops the module.
    restartIfChanged = false;
    unitConfig.X-StopOnRemoval = false;
  };

  trustedKeysFile =
    if cfg.trustedKeysFile != null then
      # A path literal is copied to the store on purpose (public keys); a
      # string is used as it is, on the host.
      (if builtins.isPath cfg.trustedKeysFile then "${cfg.trustedKeysFile}" else cfg.trustedKeysFile)
    else if cfg.trustedKeys != [ ] then
      pkgs.writeText "nixos-autodeploy-trusted-keys" (lib.concatLines cfg.trustedKeys)
    else
      null;

  opt = flag: value: optionals (value != null) [ flag (toString value) ];

  # Boot counting for systemd-boot exists from nixpkgs 26.11 on (release notes
  # rl-2611: boot.loader.systemd-boot.bootCounting); 26.05 does not declare
  # the option, so it is looked up in `options` before it is read.
  hasBootCounting = lib.hasAttrByPath [ "boot" "loader" "systemd-boot" "bootCounting" ] options;
  bootCountingOn = hasBootCounting && config.boot.loader.systemd-boot.bootCounting.enable;
  # $BOOT as nixpkgs' systemd-boot.nix computes it (bootMountPoint): the
  # XBOOTLDR partition when there is one, else the ESP; the builder writes
  # loader/entries and EFI/nixos there.
  systemdBootDir =
    let
      sdb = config.boot.loader.systemd-boot;
    in
    if sdb.xbootldrMountPoint != null then sdb.xbootldrMountPoint else config.boot.loader.efi.efiSysMountPoint;

  # The exporter as merged (whatever produced it), checked after the fact:
  # warnings, never assertions (see "The node exporter's textfile directories").
  exporterWarnings =
    let
      node = config.services.prometheus.exporters.node;
      dirs = textfileDirsIn node.extraFlags;
      textfileOff = lib.elem "textfile" node.disabledCollectors;
    in
    optional (wire && !textfileOff && !(lib.elem (normDir cfg.textfileDirectory) dirs))
      "system.autoDeploy: services.prometheus.exporters.node.extraFlags does not pass the agent's textfile directory ${cfg.textfileDirectory} (a definition with a higher priority, e.g. lib.mkForce, replaced the module's), so the agent's metrics are not exported. Add \"--collector.textfile.directory=${cfg.textfileDirectory}\" there, or set system.autoDeploy.wireNodeExporter = false to silence this."
    ++ optional (cfg.wireNodeExporter && textfileOff)
      "system.autoDeploy: services.prometheus.exporters.node.disabledCollectors disables the textfile collector, so the agent's metrics (${toString cfg.prometheusFilePath}) are not exported; nothing was wired. Remove \"textfile\" from disabledCollectors to export them, or set system.autoDeploy.wireNodeExporter = false to silence this."
    ++ optional (wire && lib.length dirs != lib.length (lib.unique dirs))
      "system.autoDeploy: services.prometheus.exporters.node.extraFlags passes a textfile directory more than once (${lib.concatStringsSep ", " dirs}); node_exporter reads it twice and every scrape fails with duplicate metrics. Where the exporter is configured through a function, which this module cannot look into, pass system.autoDeploy.textfileDirectory there only once, or set system.autoDeploy.wireNodeExporter = false."
    ++ optional (wire && lib.length node.enabledCollectors != lib.length (lib.unique node.enabledCollectors))
      "system.autoDeploy: services.prometheus.exporters.node.enabledCollectors lists a collector more than once (${lib.concatStringsSep ", " node.enabledCollectors}); node_exporter refuses a repeated flag and does not start. Where the exporter is configured through a function, which this module cannot look into, set system.autoDeploy.wireNodeExporter = false and enable the textfile collector yourself."
    ++
      optional
        (
          wire
          && lib.length (lib.unique dirs) > 1
          && nodeExporterVersion != null
          && lib.versionOlder nodeExporterVersion "1.9"
        )
        "system.autoDeploy: node_exporter ${nodeExporterVersion} reads one textfile directory, but services.prometheus.exporters.node.extraFlags passes ${toString (lib.length (lib.unique dirs))} (${lib.concatStringsSep ", " dirs}); it refuses to start. Use node_exporter 1.9 or later (nixpkgs 26.05 and later), or set system.autoDeploy.textfileDirectory to the host's directory.";

  # Fleet rollouts (issue #14): FleetLock reboot slots. The group is passed
  # only with a URL, so an unused default never reaches the command line.
  fleetlockArgs = optionals (cfg.fleetlock.url != null) [
    "--fleetlock-url"
    cfg.fleetlock.url
    "--fleetlock-group"
    cfg.fleetlock.group
  ];

  # Where the agent keeps its state and how it checks a system: the same for
  # a deploy and for the boot check.
  checkArgs =
    optionals (cfg.stateDir != defaultStateDir) [
      "--state-dir"
      cfg.stateDir
    ]
    ++ lib.concatMap (check: [
      "--health-check"
      check
    ]) cfg.healthChecks
    ++ optional (!cfg.connectivityCheck) "--no-connectivity-check";

  # argv of the agent, every element a separate argument: escaped for systemd
  # below, never glued together with string concatenation.
  agentArgs = [
    "${cfg.package}/bin/nixos-autodeploy"
    "--once"
    "--url"
    cfg.url
    "--switch-mode"
    cfg.switchMode
    "--timeout"
    (toString cfg.timeout)
    "--health-timeout"
    (toString cfg.healthTimeout)
  ]
  ++ opt "--reboot-mode" cfg.rebootMode
  ++ opt "--reboot-window" cfg.rebootWindow
  ++ opt "--prometheus-path" cfg.prometheusFilePath
  ++ opt "--boot-dir" cfg.bootDir
  ++ checkArgs
  ++ opt "--trusted-keys" trustedKeysFile
  ++ opt "--signature-url" cfg.signatureUrl
  ++ opt "--hostname" cfg.hostname
  ++ opt "--json-field" cfg.jsonField
  ++ opt "--on-success" cfg.onSuccess
  ++ opt "--on-failure" cfg.onFailure
  ++ optional cfg.acceptManualRollback "--accept-manual-rollback"
  ++ fleetlockArgs
  ++ cfg.extraArgs;

  # utils.escapeSystemdExecArgs JSON-quotes every argument and doubles `%` and
  # `$`, so nothing the user writes is expanded by systemd. The token path is
  # the one place where we *want* a specifier: `%d` is the unit's credentials
  # directory ($CREDENTIALS_DIRECTORY, systemd >= 248). It is a constant and is
  # appended unquoted on purpose.
  execStart =
    utils.escapeSystemdExecArgs agentArgs
    + lib.optionalString (cfg.tokenFile != null) " --token-file %d/${tokenCredential}";

  stateDirectory =
    if lib.hasPrefix "/var/lib/" cfg.stateDir then lib.removePrefix "/var/lib/" cfg.stateDir else null;

  # The agent's runtime directory: the host-wide lock and the own-activation
  # marker live here. Root-owned, 0755, and never removed while the system
  # runs (RuntimeDirectoryPreserve=): a manual `nixos-autodeploy` run may
  # hold the lock while the unit stops.
  runtimeDir = "/run/nixos-autodeploy";

  # --- Trigger after a manual activation --------------------------------------
  #
  # Someone ran `nixos-rebuild switch` (or `test`) by hand: run the agent once
  # right away so that nixos_autodeploy_dirty is correct at once, not one
  # interval later.
  #
  # How: switch-to-configuration restarts sysinit-reactivation.target on every
  # switch/test, after the activation script and the unit reloads, and waits
  # for that job (nixpkgs' switch-to-configuration-ng, main.rs: "restarting
  # sysinit-reactivation.target"). It does not for `boot` and `dry-activate`,
  # and the target is not started at boot (the timer's OnBootSec covers
  # boots). nixpkgs hooks its own per-switch work
  # there (systemd-tmpfiles-resetup.service, nixos/modules/system/boot/systemd/
  # tmpfiles.nix). The target wants nixos-autodeploy-trigger.service, a tiny
  # oneshot that runs `systemctl start --no-block nixos-autodeploy.service`
  # and returns at once. The earlier hook, appending to
  # /run/nixos/activation-restart-list, is deprecated in switch-to-configuration-ng
  # (a warning on every switch, removal announced for 26.11).
  #
  # Wants, not Requires: whatever the trigger does, the switch does not fail.
  # The target orders itself after what it wants (systemd.target(5), default
  # dependencies), so switch-to-configuration waits for the trigger, which
  # takes milliseconds; it never waits for an agent run (--no-block), so
  # `nixos-rebuild switch` does not block for a whole run.
  #
  # Our own activation must not trigger anything. The agent writes its PID to
  # /run/nixos-autodeploy/activating before its
  #   systemd-run --unit=nixos-autodeploy-activation --wait ... switch-to-configuration
  # and removes it after systemd-run returned. The trigger runs while that
  # switch-to-configuration waits for the target, i.e. while the marker is
  # there, and stays quiet when the PID in it is alive and the agent's
  # transient nixos-autodeploy-activation.service runs (a crashed agent's
  # stale marker is ignored, also when its PID has been reused by another
  # process; /run is empty after every boot). Even a run
  # started by mistake would not restart anything: `systemctl start` of the
  # active nixos-autodeploy.service joins the running start job, and the unit
  # has restartIfChanged = false.
  triggerScript = ''
    pid=$(cat ${runtimeDir}/activating 2>/dev/null || true)
    case "$pid" in
      "" | *[!0-9]*) ;;
      *)
        if kill -0 "$pid" 2>/dev/null && systemctl is-active --quiet nixos-autodeploy-activation.service; then
          echo "activated by nixos-autodeploy (PID $pid) itself: no run"
          exit 0
        fi
        ;;
    esac
    echo "a manual switch: starting ${unitName}"
    exec systemctl start --no-block ${unitName}
  '';
in
{
  options.system.autoDeploy = {
    enable = mkEnableOption "nixos-autodeploy, the pull-based deployment agent";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { nix = config.nix.package; };
      defaultText = literalExpression "pkgs.callPackage ./package.nix { nix = config.nix.package; }";
      example = literalExpression "inputs.nixos-autodeploy.packages.\${pkgs.stdenv.hostPlatform.system}.default";
      description = ''
        The agent package. The default runs `autodeploy.py` with a Python 3
        and a {env}`PATH` holding the system's Nix, systemd, kexec-tools and
        OpenSSH.
      '';
    };

    url = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://cache.example.org/pointers/web-1";
      description = ''
        URL of the pointer: a text file holding the store path of this host's
        system (or a JSON document, see {option}`system.autoDeploy.jsonField`).
        Required when the agent is enabled.
      '';
    };

    interval = mkOption {
      type = types.str;
      default = "04:42";
      example = "*:0/5";
      description = ''
        When the agent polls the pointer, as a calendar event
        (`OnCalendar=`) in the format described in {manpage}`systemd.time(7)`.

        The default, once a day at 04:42, is the one of
        hlsb-fulda/nixos-autodeploy, so that swapping the flake input does
        not change when hosts deploy. Polling often is cheap: a poll that
        finds nothing new is one conditional HTTP request
        (`If-None-Match`/`If-Modified-Since`) and spawns no Nix process, so
        `"*:0/5"` (every five minutes) shows a new pointer or a manual change
        (the dirty metric) within minutes; combine it with
        {option}`system.autoDeploy.rebootWindow` if reboots must stay at
        night, and with {option}`system.autoDeploy.randomizedDelay` to
        spread a fleet.
      '';
    };

    randomizedDelay = mkOption {
      type = types.str;
      default = "0";
      example = "4min";
      description = ''
        Random delay added to every timer run (`RandomizedDelaySec=`), a time
        span as described in {manpage}`systemd.time(7)`. The delay is fixed
        per host (`FixedRandomDelay=true`), so a fleet is spread evenly and
        each host keeps a regular rhythm. Keep it below
        {option}`system.autoDeploy.interval`.
      '';
    };

    switchMode = mkOption {
      type = types.enum [
        "switch"
        "boot"
        "smart"
      ];
      default = "switch";
      example = "smart";
      description = ''
        How a new system is activated: `switch` activates it now, `boot`
        makes it the boot default only (it takes effect at the next reboot),
        `smart` switches unless the kernel, initrd or systemd changed, in
        which case it behaves like `boot`. Passed as `--switch-mode`.
      '';
    };

    rebootMode = mkOption {
      type = types.nullOr (
        types.enum [
          "reboot"
          "kexec"
        ]
      );
      default = null;
      example = "reboot";
      description = ''
        What to do when the deployed system needs a reboot (boot or smart
        mode): `null` never reboots (the metric
        `nixos_autodeploy_reboot_required` says so), `reboot` reboots,
        `kexec` boots the new kernel directly. Passed as `--reboot-mode`.
      '';
    };

    rebootWindow = mkOption {
      type = types.nullOr (
        types.strMatching "([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]"
      );
      default = null;
      example = "02:00-05:00";
      description = ''
        Local time window `HH:MM-HH:MM` (it may wrap midnight) outside of
        which the agent does not reboot; `null` allows any time. Passed as
        `--reboot-window`.
      '';
    };

    wireNodeExporter = mkOption {
      type = types.bool;
      default = config.services.prometheus.exporters.node.enable;
      defaultText = literalExpression "config.services.prometheus.exporters.node.enable";
      example = false;
      description = ''
        Whether to hook the agent's metrics into the Prometheus node
        exporter: makes {option}`system.autoDeploy.textfileDirectory` the
        default location of {option}`system.autoDeploy.prometheusFilePath`
        and creates it and adds it to the exporter's textfile directories
        (`--collector.textfile.directory`, repeatable since node_exporter
        1.9), next to any the host already has; enables the textfile
        collector unless it is listed already. When the host disables the
        collector (`disabledCollectors = [ "textfile" ]`) nothing is wired
        and a warning explains it.
      '';
    };

    textfileDirectory = mkOption {
      type = externalPathType;
      default = defaultTextfileDirectory;
      example = "/run/prometheus-textfiles";
      description = ''
        The agent's own directory for the node exporter's textfile collector
        when {option}`system.autoDeploy.wireNodeExporter` is enabled. It is
        passed in addition to the textfile directories the host already has
        (node_exporter 1.9 and later read several); a directory the host
        already passes is not passed twice.
      '';
    };

    prometheusFilePath = mkOption {
      type = types.nullOr externalPathType;
      default =
        if cfg.wireNodeExporter then "${cfg.textfileDirectory}/nixos-autodeploy.prom" else null;
      defaultText = literalExpression ''
        if config.system.autoDeploy.wireNodeExporter
        then "''${config.system.autoDeploy.textfileDirectory}/nixos-autodeploy.prom"
        else null
      '';
      example = "/var/lib/prometheus-node-exporter-text/nixos-autodeploy.prom";
      description = ''
        Where the agent writes its metrics in the Prometheus text format
        (atomically, on every run); `null` writes none. Passed as
        `--prometheus-path`.
      '';
    };

    bootDir = mkOption {
      type = types.nullOr externalPathType;
      default = if config.boot.loader.systemd-boot.enable then systemdBootDir else null;
      defaultText = literalExpression ''
        if config.boot.loader.systemd-boot.enable then
          (if config.boot.loader.systemd-boot.xbootldrMountPoint != null
           then config.boot.loader.systemd-boot.xbootldrMountPoint
           else config.boot.loader.efi.efiSysMountPoint)
        else null
      '';
      example = "/boot/efi";
      description = ''
        Where the boot loader keeps its entries and the kernels it copies
        (`$BOOT`: the ESP, or the XBOOTLDR partition). The agent reads the
        boot entries there (an entry that ran out of tries is a boot-loader
        fallback, never a manual choice) and checks there that a new kernel
        fits. Follows {option}`boot.loader.efi.efiSysMountPoint` (often
        {file}`/boot`, {file}`/boot/efi` or {file}`/efi`) and
        {option}`boot.loader.systemd-boot.xbootldrMountPoint` with
        systemd-boot; `null` (GRUB, which copies kernels into
        {file}`/boot/kernels`) lets the agent take the first of {file}`/boot`,
        {file}`/efi`, {file}`/boot/efi` that holds boot loader files. Passed
        as `--boot-dir`.
      '';
    };

    stateDir = mkOption {
      type = stateDirType;
      default = defaultStateDir;
      example = "/persist/nixos-autodeploy";
      description = ''
        Directory for the agent's state (what it deployed, counters,
        quarantine, suspension). Below {file}`/var/lib` it is managed with
        `StateDirectory=`, elsewhere with a tmpfiles rule. Passed as
        `--state-dir` when it differs from the default.
      '';
    };

    timeout = mkOption {
      type = types.ints.positive;
      default = 30;
      example = 10;
      description = "Timeout of each HTTP request, in seconds. Passed as `--timeout`.";
    };

    healthChecks = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "systemctl is-active nginx.service"
        "curl -fsS http://localhost:8080/health"
      ];
      description = ''
        Commands run with `/bin/sh -c` after an activation; if one fails
        (or they take longer than {option}`system.autoDeploy.healthTimeout`)
        the agent rolls back. Each is passed as `--health-check`. The
        commands find what {option}`system.autoDeploy.path` provides (a
        command that is not found exits 127, fails the check and rolls the
        deploy back).
      '';
    };

    path = mkOption {
      type = types.listOf types.package;
      default = [ ];
      example = literalExpression "[ pkgs.curl pkgs.jq ]";
      description = ''
        Packages whose {file}`bin` and {file}`sbin` directories are put on
        the {env}`PATH` of the agent's unit, for
        {option}`system.autoDeploy.healthChecks`,
        {option}`system.autoDeploy.onSuccess` and
        {option}`system.autoDeploy.onFailure`. NixOS adds coreutils,
        findutils, gnugrep, gnused and systemd to every service; anything
        else the commands call (`curl`, `jq`, ...) must be listed here.
        Sets `systemd.services.nixos-autodeploy.path`.
      '';
    };

    environment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = literalExpression ''
        {
          https_proxy = "http://proxy.example.org:3128";
          no_proxy = "localhost,.example.org";
        }
        # or: config.networking.proxy.envVars
      '';
      description = ''
        Environment variables of the agent's unit (its health checks and hooks
        included), for example the proxy variables `http_proxy`,
        `https_proxy` and `no_proxy`. Sets
        `systemd.services.nixos-autodeploy.environment` (and the boot check's).
        Values are literal: a `%` is passed on as it is, never read as a
        systemd specifier. They end up in the unit file and the Nix store,
        readable by every user: put a proxy password in a root-only file
        and use `systemd.services.nixos-autodeploy.serviceConfig.EnvironmentFile`
        instead. Substitution from the binary cache is done by nix-daemon,
        which takes its proxy from {option}`networking.proxy`.
      '';
    };

    healthTimeout = mkOption {
      type = types.ints.positive;
      default = 120;
      example = 300;
      description = "Overall time limit of the health checks, in seconds. Passed as `--health-timeout`.";
    };

    connectivityCheck = mkOption {
      type = types.bool;
      default = true;
      example = false;
      description = ''
        Whether the agent checks, after an activation, that it can still fetch
        the pointer (and rolls back otherwise). `false` passes
        `--no-connectivity-check`.
      '';
    };

    acceptManualRollback = mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = ''
        Whether a switch back by hand to a system the agent deployed earlier
        (what `nixos-rebuild switch --rollback` does) is a verdict on the
        build it replaced: the agent quarantines that build, keeps the host
        tracked and deploys the next build CI publishes. `false` (the
        default) leaves such a host dirty until someone intervenes. `true`
        passes `--accept-manual-rollback`.
      '';
    };

    trustedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJd4bmNxDPMJgwPUd0KgYHeFvVXbBHiTNm0GlzGlxyTL ci@example" ];
      description = ''
        Public keys (OpenSSH format, or allowed-signers lines) allowed to
        sign pointers. When not empty, pointers must carry a valid signature.
        They are written to a file in the Nix store that is passed as
        `--trusted-keys`. Mutually exclusive with
        {option}`system.autoDeploy.trustedKeysFile`.
      '';
    };

    trustedKeysFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/nixos-autodeploy/allowed_signers";
      description = ''
        An allowed-signers file, or a file of SSH public keys, to use instead
        of {option}`system.autoDeploy.trustedKeys` (for keys managed outside
        of the configuration). Passed as `--trusted-keys`.
      '';
    };

    signatureUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://cache.example.org/pointers/web-1.sig";
      description = ''
        URL of the pointer's signature; `null` means the pointer URL with
        `.sig` appended. Passed as `--signature-url`.
      '';
    };

    hostname = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "web-1";
      description = ''
        Host name that signed pointers must name; `null` uses the machine's
        host name. Passed as `--hostname`.
      '';
    };

    tokenFile = mkOption {
      type = types.nullOr externalPathType;
      default = null;
      example = "/run/secrets/nixos-autodeploy-token";
      description = ''
        File holding a bearer token sent with every request
        (`Authorization: Bearer`). Give it as a string: it is never copied to
        the Nix store. The file is handed to the service with systemd's
        `LoadCredential=` (it may be readable by root only) and the agent gets
        `--token-file %d/${tokenCredential}`, i.e. a path below
        {env}`CREDENTIALS_DIRECTORY`.
      '';
    };

    jsonField = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "buildoutputs.out.path";
      description = ''
        Treat the pointer as JSON (for example a Hydra build) and take the
        store path from this dotted field. Passed as `--json-field`.
      '';
    };

    onSuccess = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "curl -fsS -X POST https://chat.example.org/hook -d deployed";
      description = ''
        Command (`/bin/sh -c`) run after a successful deploy. Passed as
        `--on-success`. Put what it calls into {option}`system.autoDeploy.path`.
      '';
    };

    onFailure = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "curl -fsS -X POST https://chat.example.org/hook -d failed";
      description = ''
        Command (`/bin/sh -c`) run after a failed deploy. Passed as
        `--on-failure`. Put what it calls into {option}`system.autoDeploy.path`.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "-f"
        "-s"
        "boot"
        "--hook-timeout"
        "30"
      ];
      description = ''
        Further arguments for the agent, appended last, each one a separate
        argument; they override what the options above pass. The short flags
        of hlsb-fulda/nixos-autodeploy keep working here: `-f` (`--force`),
        `-s MODE` (`--switch-mode`), `-r MODE` (`--reboot-mode`).
      '';
    };

    # Fleet rollouts (issue #14): coordinated reboots with FleetLock.
    fleetlock = {
      url = mkOption {
        type = types.nullOr (types.strMatching "https?://.+");
        default = null;
        example = "http://fleetlock.example.org:8080";
        description = ''
          Base URL of a FleetLock server (Zincati's reboot-slot protocol,
          served by coreos/airlock or poseidon/fleetlock). Before every reboot
          or kexec (`rebootMode`) the agent takes a slot with
          `POST <url>/v1/pre-reboot`; without one it does not reboot this run
          (state `waiting_reboot_slot`) and asks again on the next. Once the
          new system is verified healthy it releases the slot
          (`POST <url>/v1/steady-state`). `null` reboots without asking.
          Passed as `--fleetlock-url`.
        '';
      };

      group = mkOption {
        type = types.strMatching "[a-zA-Z0-9.-]{1,64}";
        default = "default";
        example = "workers";
        description = ''
          FleetLock reboot group: hosts of one group share its slots. Passed
          as `--fleetlock-group` (only together with `fleetlock.url`).
        '';
      };
    };
  };

  # --- Boot assessment (issue #13): options --------------------------------
  options.system.autoDeploy.bootAssessment = {
    enable = mkEnableOption ''
      the boot assessment: a check unit, ordered before and required by
      `boot-complete.target`, that runs `nixos-autodeploy check-boot` with the
      agent's health checks and connectivity check. With systemd-boot's boot
      counting ({option}`boot.loader.systemd-boot.bootCounting.enable`, NixOS
      26.11 and later), a
      failing check keeps the boot entry from being blessed by
      `systemd-bless-boot.service`, and after its tries the boot loader falls
      back to the previous generation. See {manpage}`systemd.special(7)`
      (`boot-complete.target`) and {manpage}`systemd-bless-boot.service(8)`
    '';

    wait = mkOption {
      type = types.ints.unsigned;
      default = 300;
      example = 600;
      description = ''
        How long, in seconds, `check-boot` retries failing checks while the
        network comes up before it gives up and fails the boot. Passed as
        `check-boot --wait`.
      '';
    };
  };

  config = mkMerge [
    (mkIf cfg.enable {
      assertions = [
        {
          assertion = cfg.url != null && cfg.url != "";
          message = "system.autoDeploy.url must be set when system.autoDeploy.enable is true.";
        }
        {
          assertion = cfg.trustedKeys == [ ] || cfg.trustedKeysFile == null;
          message = "system.autoDeploy.trustedKeys and system.autoDeploy.trustedKeysFile are mutually exclusive.";
        }
        {
          # A JSON answer (Hydra) carries no `revision:` line, which signed
          # pointers require: the agent would refuse every pointer.
          assertion = cfg.jsonField == null || trustedKeysFile == null;
          message = "system.autoDeploy.jsonField cannot be combined with trusted keys (signed pointers are plain text).";
        }
      ];

      warnings =
        optional (cfg.fleetlock.url != null && cfg.interval == "04:42")
          "system.autoDeploy.fleetlock.url is set with the daily default interval: a host that gets no reboot slot asks again only the next day, and every host asks at the same minute. Poll more often (e.g. interval = \"*:0/5\")."
        ++ optional (cfg.signatureUrl != null && trustedKeysFile == null)
          "system.autoDeploy.signatureUrl is set but no trusted keys are configured, so signatures are not checked."
        ++
          optional
            (
              cfg.wireNodeExporter
              && cfg.prometheusFilePath != null
              && dirOf cfg.prometheusFilePath != cfg.textfileDirectory
            )
            "system.autoDeploy.prometheusFilePath is not in system.autoDeploy.textfileDirectory, so the node exporter will not see it."
        ++ exporterWarnings;

      environment.systemPackages = [ cfg.package ];

      systemd.services.nixos-autodeploy = agentUnitBase // {
        description = "NixOS pull-based deployment agent";
        serviceConfig = {
          Type = "oneshot";
          ExecStart = execStart;
          # No Restart=: the timer is the retry; a failing pointer or cache
          # must not become a restart storm.

          # The host-wide lock and the own-activation marker (see above).
          RuntimeDirectory = lib.removePrefix "/run/" runtimeDir;
          RuntimeDirectoryMode = "0755";
          RuntimeDirectoryPreserve = "yes";
        }
        // lib.optionalAttrs (stateDirectory != null) {
          StateDirectory = stateDirectory;
          StateDirectoryMode = "0700";
        }
        // lib.optionalAttrs (cfg.tokenFile != null) {
          # The secret stays where it is; systemd copies it into a private,
          # root-only directory for the duration of the run.
          LoadCredential = tokenCredentials;
        };
      };

      systemd.timers.nixos-autodeploy = {
        description = "Poll the NixOS deployment pointer";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          Unit = unitName;
          OnCalendar = cfg.interval;
          # One run shortly after every boot: confirms what was booted and
          # records a deploy that needed a reboot.
          OnBootSec = "2min";
          RandomizedDelaySec = cfg.randomizedDelay;
          FixedRandomDelay = true;
          Persistent = true;
        };
      };

      # Started by every switch/test (see triggerScript); returns at once.
      systemd.services.nixos-autodeploy-trigger = {
        description = "Run nixos-autodeploy after a manual activation";
        wantedBy = [ "sysinit-reactivation.target" ];
        before = [ "sysinit-reactivation.target" ];
        # Started by the switch itself, never restarted because it changed.
        restartIfChanged = false;
        serviceConfig.Type = "oneshot";
        # `systemctl` comes from the service's default path (systemd).
        script = triggerScript;
      };

      systemd.tmpfiles.rules = [
        # Also there for a manual `nixos-autodeploy` run before the unit ever ran.
        "d ${runtimeDir} 0755 root root - -"
      ]
      ++ optional (stateDirectory == null) "d ${cfg.stateDir} 0700 root root - -";
    })

    # The node-exporter wiring. Every condition sits on the leaf option it
    # sets: `services.prometheus.exporters` is ONE submodule-typed option in
    # nixpkgs, so a mkIf around `services.prometheus.exporters.node` would be
    # discharged at that option, and its condition (wireNodeExporter, whose
    # default is exporters.node.enable) would read that option's own value:
    # infinite recursion.
    {
      services.prometheus.exporters.node = lib.mkOverride (joinPrio otherNodeDefs) {
        enabledCollectors = mkIf (wire && !(lib.elem "textfile" (otherNodeList "enabledCollectors"))) (
          lib.mkOverride (joinPrio (otherNodeField "enabledCollectors")) [ "textfile" ]
        );
        extraFlags = mkIf wireFlag (
          lib.mkOverride (joinPrio (otherNodeField "extraFlags")) [
            "--collector.textfile.directory=${cfg.textfileDirectory}"
          ]
        );
      };
      # Only a directory we point the exporter at is ours to create; an
      # existing one is left as its owner set it up.
      systemd.tmpfiles.rules = mkIf wireFlag [ "d ${cfg.textfileDirectory} 0755 root root - -" ];
    }

    # --- Boot assessment (issue #13): the check unit ---------------------------
    #
    # systemd-bless-boot.service (pulled in when systemd-boot booted an entry
    # with a try counter) requires boot-complete.target; this unit is required
    # by that target and ordered before it, so a failing check fails the
    # target and the entry is never marked good. Without boot counting
    # nothing pulls boot-complete.target in and the unit does not run: the
    # agent's own verification after the reboot stays the safety net.
    (mkIf (cfg.enable && cfg.bootAssessment.enable) {
      warnings =
        optional (hasBootCounting && !bootCountingOn)
          "system.autoDeploy.bootAssessment is enabled but boot.loader.systemd-boot.bootCounting.enable is not: no boot entry carries a try counter, so nothing reaches boot-complete.target and the boot check does not run (the agent still verifies a boot-mode deploy after the reboot)."
        ++ optional (!hasBootCounting)
          "system.autoDeploy.bootAssessment is enabled, but this nixpkgs has no boot counting for systemd-boot (boot.loader.systemd-boot.bootCounting comes with NixOS 26.11; 26.05 does not have it): unless something else gives boot entries a try counter, nothing reaches boot-complete.target and the boot check does not run (the agent still verifies a boot-mode deploy after the reboot).";

      # It judges a boot, not a configuration: never (re)started by an
      # activation (agentUnitBase); its health checks find what the agent's find.
      systemd.services.nixos-autodeploy-boot-check = agentUnitBase // {
        description = "nixos-autodeploy boot assessment (health checks before the boot is blessed)";
        requiredBy = [ "boot-complete.target" ];
        before = [ "boot-complete.target" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart =
            utils.escapeSystemdExecArgs (
              [
                "${cfg.package}/bin/nixos-autodeploy"
                "check-boot"
                "--url"
                cfg.url
                "--wait"
                (toString cfg.bootAssessment.wait)
                "--timeout"
                (toString cfg.timeout)
                "--health-timeout"
                (toString cfg.healthTimeout)
              ]
              ++ checkArgs
            )
            + lib.optionalString (cfg.tokenFile != null) " --token-file %d/${tokenCredential}";
          # Bounded: the retries, one last round of checks, and some slack.
          TimeoutStartSec = cfg.bootAssessment.wait + cfg.healthTimeout + 60;
        }
        // lib.optionalAttrs (stateDirectory != null) {
          StateDirectory = stateDirectory;
          StateDirectoryMode = "0700";
        }
        // lib.optionalAttrs (cfg.tokenFile != null) {
          LoadCredential = tokenCredentials;
        };
      };
    })
  ];
}
